"""HTTP routes of the airlock: ``/v1/permits/{permit_id}/exports``.

Contract
--------
* ``POST   /exports``                         researcher: open a draft (justification, DP
  release receipts as the query API returned them).
* ``POST   /exports/{id}/files?name=``        researcher: the file's bytes as the body
  (``application/octet-stream``) streamed into quarantine while hashed; SHA-256 and size
  recorded and returned. This route alone takes bodies past ``max_request_bytes`` (up to
  ``airlock_max_file_bytes``, see ``spe.api.middleware.StreamedRoute``); the permit's limits
  are checked before the first byte is read and again when the file is recorded.
* ``DELETE /exports/{id}/files/{file_id}``    researcher: remove a file from a draft.
* ``POST   /exports/{id}/submit|withdraw|revise`` researcher: state changes.
* ``POST   /exports/{id}/votes``              hospital admin other than the requester.
* ``GET    /exports``, ``GET /exports/{id}``  anyone who may see the permit (votes hidden from
  a reviewer until they voted; the researcher sees only shared comments after the decision).
* ``GET    /exports/{id}/files/{file_id}/content`` the permit's persons, released files only.

Export writes (create, upload, submit) pass per-token and per-permit rate limits and at most
``airlock_token_concurrent_uploads`` uploads of one token at once (:mod:`spe.airlock.limits`):
429 with ``Retry-After``, before any byte of an upload is read.

Every route is an :class:`~spe.api.routing.AuditedRoute` (refusals audited); the service
audits every act. At start the router subscribes to the permit event stream (suspended,
revoked, expired: open requests are rejected), finishes or removes uploads a crash
interrupted (``Quarantine.sweep``), closes requests of permits that ended while the API was
down, deletes quarantined files past their retention (now and every
``airlock_purge_interval_seconds``: ``AirlockService.purge_expired``), and starts the durable
follower of the event outbox
(``spe.airlock.follower``) for changes made by other processes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from permits import events
from spe.airlock.follower import EventFollower
from spe.airlock.limits import ExportLimits
from spe.airlock.service import AirlockService
from spe.airlock.storage import CHUNK
from spe.api.deps import AppStateDep, CurrentPrincipal, PermitId
from spe.api.problems import problem_responses
from spe.api.routing import AuditedRoute
from spe.api.state import AppState, StateKey
from spe.auth.principal import Principal
from spe.errors import PayloadTooLarge

logger = logging.getLogger("spe.airlock")
AIRLOCK_SERVICE: StateKey[AirlockService] = StateKey("airlock.service")
ENDING = frozenset({events.EventKind.SUSPENDED, events.EventKind.REVOKED,
                    events.EventKind.EXPIRED})


#: The app's export-write limits, one set per app.
EXPORT_LIMITS: StateKey[ExportLimits] = StateKey("airlock.limits")


def export_limits(state: AppState) -> ExportLimits:
    return state.get_or_create(EXPORT_LIMITS, lambda: ExportLimits(state.settings))


def _token_key(principal: Principal) -> str:
    """One key per token: a workspace token by its id, any other caller by its subject."""
    if principal.token_id:
        return f"token:{principal.token_id}"
    return f"{principal.kind}:{principal.subject}"


def airlock_service(state: AppState) -> AirlockService:
    return state.get_or_create(AIRLOCK_SERVICE, lambda: AirlockService(state.db, state.settings))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service = airlock_service(app.state.spe)

    def on_event(event: events.PermitEventRecord) -> None:
        if event.kind in ENDING:
            service.close_for_permit(event.permit_id)

    unsubscribe = events.subscribe(on_event)
    follower = EventFollower(service)
    purger: asyncio.Task[None] | None = None
    try:
        await run_in_threadpool(service.sweep_quarantine)
        await run_in_threadpool(service.close_ended)
        try:
            await run_in_threadpool(service.resume_mia_jobs)
        except Exception:  # fails closed: those files still wait, the API still starts
            logger.exception("airlock: restarting lost membership-inference jobs failed")
        follower.start()
        interval = app.state.spe.settings.airlock_purge_interval_seconds
        if interval > 0:
            purger = asyncio.create_task(_purge_every(service, interval))
        yield
    finally:
        unsubscribe()
        follower.stop()
        if purger is not None:
            purger.cancel()


async def _purge_every(service: AirlockService, interval: float) -> None:
    """Delete quarantined files past their retention now and every ``interval`` seconds."""
    while True:
        try:
            await run_in_threadpool(service.purge_expired)
        except Exception:  # the next round tries again; the API stays up
            logger.exception("airlock purge failed")
        await asyncio.sleep(interval)


router = APIRouter(route_class=AuditedRoute, tags=["exports"], lifespan=lifespan)

ExportId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="The export request's id.")]
FileId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="The file's id.")]
FileName = Annotated[str, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", max_length=100,
                               description="A display name (the kind is decided from the "
                               "content, never from this name).")]
_BASE = "/v1/permits/{permit_id}/exports"
#: The upload route's path, streamed past the API-wide body limit (``spe.api.app``).
UPLOAD_PATH = re.compile(r"/v1/permits/[^/]+/exports/[0-9a-f]{32}/files")
_ERRORS = problem_responses(401, 403, 404, 409, 413, 422, 429)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExportCreate(_Strict):
    justification: str = Field(min_length=10, max_length=4000,
                               description="Why these results need to leave, for reviewers.")
    receipts: list[dict[str, Any]] = Field(
        default_factory=list, max_length=50,
        description="DP release receipts exactly as the query API returned them; a file whose "
        "exact bytes one of them covers is released without review.")


class VoteIn(_Strict):
    decision: Literal["approve", "reject", "return"]
    comment: str | None = Field(None, max_length=4000)
    shared: bool = Field(False, description="Show the comment to the researcher after the "
                         "decision (otherwise reviewers only).")
    override_reason: str | None = Field(
        None, min_length=10, max_length=4000,
        description="Required to approve over a failed check or to reject when all passed.")
    files: dict[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")],
                Literal["approve", "reject", "return"]] | None = Field(
        None, max_length=1000,
        description="Per-file decisions where they differ from `decision` (file id -> "
        "decision). A file is released only when every reviewer approves it.")


def _svc(state: AppState) -> AirlockService:
    return airlock_service(state)


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)


@router.post(_BASE, name="airlock.create", operation_id="createExport", status_code=201,
             summary="Open an export request (draft)", responses=_ERRORS)
def create_export(state: AppStateDep, principal: CurrentPrincipal, permit_id: PermitId,
                  body: ExportCreate) -> JSONResponse:
    export_limits(state).write(permit_id, _token_key(principal))
    return _json(_svc(state).create(principal, permit_id, body.justification, body.receipts),
                 201)


@router.get(_BASE, name="airlock.list", operation_id="listExports",
            summary="List a permit's export requests", responses=_ERRORS)
def list_exports(state: AppStateDep, principal: CurrentPrincipal,
                 permit_id: PermitId) -> JSONResponse:
    return _json({"items": _svc(state).list_requests(principal, permit_id)})


@router.get(_BASE + "/{export_id}", name="airlock.read", operation_id="getExport",
            summary="Read an export request", responses=_ERRORS)
def get_export(state: AppStateDep, principal: CurrentPrincipal, permit_id: PermitId,
               export_id: ExportId) -> JSONResponse:
    return _json(_svc(state).get(principal, permit_id, export_id))


@router.post(_BASE + "/{export_id}/files", name="airlock.upload",
             operation_id="uploadExportFile", status_code=201,
             summary="Upload a file's bytes into quarantine",
             description="The body is the file (application/octet-stream), streamed to "
             "quarantine: at most airlock_max_file_bytes and what the request's byte limit "
             "leaves (the API-wide max_request_bytes does not apply here); `name` is for "
             "display only. Its SHA-256 and size are recorded; it never changes again.",
             responses=_ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
async def upload_file(request: Request, state: AppStateDep, principal: CurrentPrincipal,
                      permit_id: PermitId, export_id: ExportId, name: FileName) -> JSONResponse:
    with export_limits(state).upload(permit_id, _token_key(principal)):
        return await _upload(request, state, principal, permit_id, export_id, name)


async def _upload(request: Request, state: AppState, principal: Principal, permit_id: str,
                  export_id: str, name: str) -> JSONResponse:
    svc = _svc(state)
    limit = await run_in_threadpool(svc.upload_limit, principal, permit_id, export_id)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The file is larger than the {limit} bytes this request can "
                              "still take.")
    staged = await run_in_threadpool(svc.stage, export_id, limit)
    try:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= CHUNK:
                await run_in_threadpool(staged.write, bytes(pending))
                pending.clear()
        if pending:
            await run_in_threadpool(staged.write, bytes(pending))
        view = await run_in_threadpool(svc.record_upload, principal, permit_id, export_id,
                                       name, staged)
    except OverflowError:
        raise PayloadTooLarge(f"The file is larger than the {limit} bytes this request can "
                              "still take.") from None
    finally:
        await run_in_threadpool(staged.discard)  # a no-op once published
    return _json(view, 201)


@router.delete(_BASE + "/{export_id}/files/{file_id}", name="airlock.remove_file",
               operation_id="removeExportFile", status_code=204,
               summary="Remove a file from a draft", responses=_ERRORS)
def remove_file(state: AppStateDep, principal: CurrentPrincipal, permit_id: PermitId,
                export_id: ExportId, file_id: FileId) -> Response:
    _svc(state).remove_file(principal, permit_id, export_id, file_id)
    return Response(status_code=204)


@router.post(_BASE + "/{export_id}/submit", name="airlock.submit", operation_id="submitExport",
             summary="Submit: freeze the files and run the automated checks", responses=_ERRORS)
def submit_export(state: AppStateDep, principal: CurrentPrincipal, permit_id: PermitId,
                  export_id: ExportId) -> JSONResponse:
    export_limits(state).write(permit_id, _token_key(principal))
    return _json(_svc(state).submit(principal, permit_id, export_id))


@router.post(_BASE + "/{export_id}/withdraw", name="airlock.withdraw",
             operation_id="withdrawExport", summary="Withdraw an export request",
             responses=_ERRORS)
def withdraw_export(state: AppStateDep, principal: CurrentPrincipal, permit_id: PermitId,
                    export_id: ExportId) -> JSONResponse:
    return _json(_svc(state).withdraw(principal, permit_id, export_id))


@router.post(_BASE + "/{export_id}/revise", name="airlock.revise", operation_id="reviseExport",
             summary="Back to draft after a return for changes", responses=_ERRORS)
def revise_export(state: AppStateDep, principal: CurrentPrincipal, permit_id: PermitId,
                  export_id: ExportId) -> JSONResponse:
    return _json(_svc(state).revise(principal, permit_id, export_id))


@router.post(_BASE + "/{export_id}/votes", name="airlock.vote", operation_id="voteExport",
             summary="A reviewer's vote", responses=_ERRORS)
def vote_export(state: AppStateDep, principal: CurrentPrincipal, permit_id: PermitId,
                export_id: ExportId, body: VoteIn) -> JSONResponse:
    return _json(_svc(state).vote(principal, permit_id, export_id, body.decision,
                                  body.comment, body.shared, body.override_reason,
                                  body.files))


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@router.get(_BASE + "/{export_id}/files/{file_id}/content", name="airlock.download",
            operation_id="downloadExportFile", summary="Download a released file",
            responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS})
def download_file(state: AppStateDep, principal: CurrentPrincipal, permit_id: PermitId,
                  export_id: ExportId, file_id: FileId) -> Response:
    got = _svc(state).download(principal, permit_id, export_id, file_id)
    name = _SAFE_NAME.sub("_", got.name)
    return StreamingResponse(got.chunks(), media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{name}"',
        "Content-Length": str(got.size),
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
        "Digest": f"sha-256={got.sha256}"})
