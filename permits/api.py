"""HTTP routes of the permits package: ``/v1/permits`` and ``/v1/permit-events``.

Contract
--------
* The service (``permits.service.PermitService``) and the expiry sweeper live in typed slots
  of the app state (``spe.api.deps.PERMIT_SERVICE`` / ``PERMIT_SWEEPER``; ``get_service(state)``,
  ``get_sweeper(state)``). The sweeper starts and stops with the app (router lifespan); tests
  call ``get_sweeper(state).run_once()`` to expire on demand.
* Every route is a :class:`spe.api.routing.AuditedRoute`: any refusal (an ``SPEError`` or a
  schema error) is written to the audit log with the caller, the route's action (its name, an
  ``AuditAction``), the permit id and the reason, never the request body.
* Successful responses carry ``ETag`` where a single permit is returned; ``PATCH`` needs
  ``If-Match``; ``POST /v1/permits`` honours ``Idempotency-Key``.
"""


from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from permits.expiry import ExpirySweeper
from permits.schemas import (
    ExtendRequest,
    PermitCreate,
    PermitEventPage,
    PermitPage,
    PermitPublic,
    PermitUpdate,
    PermitVersionList,
    PermitVersionPublic,
    ReasonRequest,
)
from permits.service import PermitService
from permits.states import Action
from permits.terms import PermitStatus
from spe.api.deps import (
    PERMIT_SERVICE,
    PERMIT_SWEEPER,
    CurrentPrincipal,
    PermitId,
    ReadingPrincipal,
    permit_service,
    permit_sweeper,
)
from spe.api.problems import problem_responses
from spe.api.routing import AuditedRoute
from spe.api.state import AppState, get_state

# The app's permit service and sweeper live in typed slots of the app state (spe.api.deps);
# these names stay for callers and tests.
SERVICE_KEY = PERMIT_SERVICE
SWEEPER_KEY = PERMIT_SWEEPER


def get_service(state: AppState) -> PermitService:
    """The app's permit service (created on first use, with Keycloak groups)."""
    return permit_service(state)


def get_sweeper(state: AppState) -> ExpirySweeper:
    return permit_sweeper(state)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    sweeper = get_sweeper(app.state.spe)
    sweeper.start()
    try:
        yield
    finally:
        sweeper.stop()


def _service(request: Request) -> PermitService:
    return get_service(get_state(request))


router = APIRouter(route_class=AuditedRoute, tags=["permits"], lifespan=lifespan)


# OpenAPI documentation helpers --------------------------------------------------------------

def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return problem_responses(*codes)


def example(model: type[BaseModel]) -> Any:
    """The first example declared in a schema's ``json_schema_extra`` (None if none)."""
    extra: Any = model.model_config.get("json_schema_extra") or {}
    examples = extra.get("examples") if isinstance(extra, dict) else None
    return examples[0] if examples else None


def _ok(model: type[BaseModel], description: str, code: int = 200
        ) -> dict[int | str, dict[str, Any]]:
    sample = example(model)
    content: dict[str, Any] = {"application/json": {"example": sample}} if sample else {}
    return {code: {"description": description, "content": content}}


def _example_permit() -> dict[str, Any]:
    return dict(example(PermitPublic))


_READ_ERRORS = (401, 403, 404, 422)
_WRITE_ERRORS = (401, 403, 404, 409, 412, 413, 422, 503)

def _permit_response(permit: PermitPublic, status_code: int = 200) -> Response:
    return Response(permit.model_dump_json(), status_code=status_code,
                    media_type="application/json", headers={"ETag": permit.etag})


# Routes -------------------------------------------------------------------------------------

@router.post(
    "/v1/permits", name="permit.issue", operation_id="issuePermit", status_code=201,
    summary="Issue a permit",
    description="An access body issues a data permit. Datasets, tables and columns are checked "
    "against the registry, persons against Keycloak; the permit's Keycloak group is created. "
    "Send an `Idempotency-Key` to make retries safe: the same key with the same body returns "
    "the first response (header `Idempotent-Replayed: true`); with a different body, 422.",
    response_model=PermitPublic,
    responses={**_ok(PermitPublic, "The permit as issued (version 1).", 201),
               **_errors(401, 403, 409, 413, 422, 503)},
)
def issue_permit(
    request: Request,
    principal: CurrentPrincipal,
    body: Annotated[PermitCreate, Body(openapi_examples={
        "dp_only": {"summary": "A DP-only research permit",
                    "value": example(PermitCreate)},
    })],
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
        description="Client-chosen key that makes retries of this request safe.",
        examples=["issue-0042-2026-FI"])] = None,
) -> Response:
    result = _service(request).issue(principal, body, idempotency_key=idempotency_key)
    headers = {"ETag": result.etag, "Location": f"/v1/permits/{result.permit_id}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(result.body, status_code=result.status_code, headers=headers)


@router.get(
    "/v1/permits", name="permit.list", operation_id="listPermits", summary="List permits",
    description="Permits visible to the caller (an access body: its own; a hospital admin: "
    "all; a researcher: those naming them), oldest first. Filter by effective status, "
    "dataset or person; page with `cursor` (from `next_cursor`) and `limit`.",
    response_model=PermitPage,
    responses={200: {"description": "One page of permits.", "content": {"application/json": {
        "example": {"items": [_example_permit()], "next_cursor": "eyJzIjo0Mn0"}}}},
        **_errors(*_READ_ERRORS)},
)
def list_permits(
    request: Request,
    principal: CurrentPrincipal,
    status: Annotated[PermitStatus | None, Query(description="Effective status.")] = None,
    dataset: Annotated[str | None, Query(max_length=64, examples=["omop_demo"])] = None,
    person: Annotated[str | None, Query(max_length=100, examples=["alice"])] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="Opaque cursor.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> Response:
    page = _service(request).list_permits(principal, status=status, dataset=dataset,
                                          person=person, cursor=cursor, limit=limit)
    return Response(page.model_dump_json(), media_type="application/json")


@router.get(
    "/v1/permits/{permit_id}", name="permit.read", operation_id="getPermit",
    summary="Read a permit",
    description="The newest version with its effective status (expired as soon as valid_until "
    "has passed). The `ETag` header is what `PATCH` needs in `If-Match`.",
    response_model=PermitPublic,
    responses={**_ok(PermitPublic, "The permit."), **_errors(*_READ_ERRORS)},
)
async def get_permit(request: Request, principal: ReadingPrincipal,
                     permit_id: PermitId) -> Response:
    view = _service(request).view(principal, permit_id)
    return Response(view.json_bytes(), media_type="application/json",
                    headers={"ETag": view.etag})


@router.patch(
    "/v1/permits/{permit_id}", name="permit.amend", operation_id="amendPermit",
    summary="Amend a permit",
    description="Change some fields; creates a new version (history at /versions). Needs "
    "`If-Match` with the current ETag: 428 when missing, 412 when stale. An expired or revoked "
    "permit cannot be amended (409). The validity window changes only through /extend.",
    response_model=PermitPublic,
    responses={**_ok(PermitPublic, "The permit's new version."),
               **_errors(*_WRITE_ERRORS, 428)},
)
def amend_permit(
    request: Request,
    principal: CurrentPrincipal,
    permit_id: PermitId,
    body: Annotated[PermitUpdate, Body(openapi_examples={
        "add_person": {"summary": "Add a person and raise the budget",
                       "value": example(PermitUpdate)},
    })],
    if_match: Annotated[str | None, Header(
        alias="If-Match", max_length=200, description="The ETag of the version you amend.",
        examples=['"3f0c7f6e-v1-5d41402abc4b2a76"'])] = None,
) -> Response:
    return _permit_response(_service(request).amend(principal, permit_id, body, if_match))


@router.get(
    "/v1/permits/{permit_id}/versions", name="permit.versions", operation_id="listPermitVersions",
    summary="History of a permit",
    description="Every version, oldest first: the full snapshot, the change, who and when.",
    response_model=PermitVersionList,
    responses={200: {"description": "All versions.", "content": {"application/json": {
        "example": {"items": [example(PermitVersionPublic)]}}}},
        **_errors(*_READ_ERRORS)},
)
def permit_versions(request: Request, principal: CurrentPrincipal,
                    permit_id: PermitId) -> Response:
    items = _service(request).versions(principal, permit_id)
    return Response(PermitVersionList(items=items).model_dump_json(),
                    media_type="application/json")


def _state_change(action: Action, summary: str, description: str) -> Callable[..., Response]:
    def endpoint(
        request: Request,
        principal: CurrentPrincipal,
        permit_id: PermitId,
        body: Annotated[ReasonRequest, Body(openapi_examples={
            "reason": {"summary": "Why", "value": {"reason": f"{summary} requested by the "
                                                   "access body after review."}}})],
        if_match: Annotated[str | None, Header(
            alias="If-Match", max_length=200,
            description="Optional: refuse (412) unless the permit is still at this ETag.",
            examples=['"3f0c7f6e-v1-5d41402abc4b2a76"'])] = None,
    ) -> Response:
        return _permit_response(_service(request).transition(
            principal, permit_id, action, reason=body.reason, if_match=if_match))

    router.add_api_route(
        f"/v1/permits/{{permit_id}}/{action.value}", endpoint, methods=["POST"],
        name=f"permit.{action.value}", operation_id=f"{action.value}Permit", summary=summary,
        description=description, response_model=PermitPublic,
        responses={**_ok(PermitPublic, "The permit's new version."), **_errors(*_WRITE_ERRORS)},
    )
    return endpoint


suspend_permit = _state_change(
    Action.SUSPEND, "Suspend a permit",
    "Halts access at once: workspace tokens are revoked, workspaces stop, pending exports are "
    "refused. Allowed from active (or not yet started); 409 otherwise.")
resume_permit = _state_change(
    Action.RESUME, "Resume a suspended permit",
    "Makes a suspended permit active again. A revoked or expired permit cannot be resumed (409).")
revoke_permit = _state_change(
    Action.REVOKE, "Revoke a permit",
    "Final (EHDS Art 63): tokens revoked, the Keycloak group removed. 409 when already revoked "
    "or expired.")


@router.post(
    "/v1/permits/{permit_id}/extend", name="permit.extend", operation_id="extendPermit",
    summary="Extend a permit once",
    description="Moves valid_until later, once per permit (EHDS Art 68(12)), by at most 10 "
    "years. A second extension, or extending an expired or revoked permit, is 409.",
    response_model=PermitPublic,
    responses={**_ok(PermitPublic, "The permit's new version."), **_errors(*_WRITE_ERRORS)},
)
def extend_permit(
    request: Request,
    principal: CurrentPrincipal,
    permit_id: PermitId,
    body: Annotated[ExtendRequest, Body(openapi_examples={
        "extend": {"summary": "Extend by two years",
                   "value": example(ExtendRequest)},
    })],
    if_match: Annotated[str | None, Header(alias="If-Match", max_length=200,
                                           examples=['"3f0c7f6e-v1-5d41402abc4b2a76"'])] = None,
) -> Response:
    return _permit_response(_service(request).transition(
        principal, permit_id, Action.EXTEND, reason=body.reason, if_match=if_match,
        new_valid_until=body.valid_until))


@router.get(
    "/v1/permit-events", name="permit.events", operation_id="listPermitEvents",
    summary="Poll the permit event stream",
    description="Events with id > `after`, in order (issued, amended, suspended, resumed, "
    "revoked, expired, extended). For SPE components (JupyterHub): operators and hospital "
    "admins only. Remember `last_id` and pass it as `after` next time.",
    response_model=PermitEventPage,
    responses={**_ok(PermitEventPage, "Events after the cursor."), **_errors(401, 403, 422)},
)
def permit_events(
    request: Request,
    principal: CurrentPrincipal,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="Last event id seen.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    page = _service(request).event_page(principal, after=after, limit=limit)
    return Response(page.model_dump_json(), media_type="application/json")
