"""Export review pages: the queue, a request's page with its file checks, the vote form, and
researchers' downloads of released files.

Contract
--------
* Everything goes through :class:`spe.airlock.service.AirlockService` (the app's instance,
  ``spe.airlock.api.airlock_service``): ``get`` (authorises by permit, audits the read and hides
  votes as the service decides), ``vote`` (hospital admins other than the requester, the
  override reason the service asks for), ``download`` (persons the permit names, with their own
  login), ``list_requests`` (one permit's requests).
* The queue (hospital admins) is one indexed query over the requests in review, oldest first,
  filtered by permit and age; reading it is audited as ``airlock.list`` with its filters.
* For reviewers (hospital admins), a table file is rendered (first rows) with each count cell
  below the permit's minimum cell count marked (text and a symbol, not colour alone) by the
  airlock's own rules (``checks.count_columns``, ``sdc.below_threshold``), and a text file is
  shown as text; a PNG, JPEG or GIF is shown through ``.../preview/{file}`` (same checks, its
  sniffed type, ``Content-Security-Policy: default-src 'none'; sandbox``, never SVG or PDF,
  which can carry script); the bytes are read from quarantine only after ``get`` authorised
  the request.
* A request or permit the person may not see is 404 (``permits.policy``); a refused vote shows
  the service's reason, which names the rule and never echoes what was sent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from spe.airlock import checks as airlock_checks
from spe.airlock import pdf_preview, sdc
from spe.airlock.api import airlock_service
from spe.airlock.models import ExportFile, ExportRelease, ExportRequest
from spe.airlock.states import State
from spe.api.state import get_state
from spe.audit import AuditAction
from spe.auth.principal import Role
from spe.errors import Conflict, Forbidden, InvalidInput, NotFound
from spe.web import views
from spe.web.views import _audit, _form, _login_redirect, _session, _valid_id, not_found, page

router = views.router
DECISIONS = ("approve", "reject", "return")


@router.get("/console/exports")
def queue(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    if Role.HOSPITAL_ADMIN not in session.principal.roles or session.principal.kind != "user":
        return not_found(request, session)
    state = get_state(request)
    permit = request.query_params.get("permit_id") or None
    wanted = request.query_params.get("state") or State.IN_REVIEW.value
    try:
        older = int(request.query_params.get("older_than_days") or 0)
        if wanted not in {s.value for s in State} or not 0 <= older <= 3650 or \
                (permit is not None and not _valid_id(permit)):
            raise ValueError
    except ValueError:
        return page(request, "error.html", 400, session, title="Not shown",
                    message="A filter is not valid.")
    query = select(ExportRequest).where(ExportRequest.state == wanted)
    if permit:
        query = query.where(ExportRequest.permit_id == permit)
    if older:
        query = query.where(ExportRequest.created_at <= datetime.now(UTC) - timedelta(days=older))
    with state.db.read() as s:
        rows = [{"id": r.id, "permit_id": r.permit_id, "requester": r.requester,
                 "state": r.state, "round": r.round, "created_at": r.created_at,
                 "reviewers_required": r.reviewers_required}
                for r in s.execute(query.order_by(ExportRequest.created_at).limit(200))
                .scalars()]
    _audit(state, session.principal, AuditAction.AIRLOCK_LIST, details={
        "queue": True, "returned": len(rows),
        "filters": {"permit_id": permit, "state": wanted, "older_than_days": older}})
    return page(request, "queue.html", session=session, title="Export review queue",
                rows=rows, filters={"permit_id": permit or "", "state": wanted,
                                    "older_than_days": older or ""},
                states=[s.value for s in State], now=datetime.now(UTC))


def _view(request: Request, permit_id: str, request_id: str) -> tuple[Any, dict[str, Any] | None]:
    session = _session(request)
    if session is None or not _valid_id(permit_id) or not _valid_id(request_id):
        return session, None
    try:
        return session, airlock_service(get_state(request)).get(session.principal, permit_id,
                                                                 request_id)
    except (NotFound, Forbidden):
        return session, None


@router.get("/console/permits/{permit_id}/exports/{request_id}")
def request_page(request: Request, permit_id: str, request_id: str) -> Response:
    session, view = _view(request, permit_id, request_id)
    if session is None:
        return _login_redirect(request)
    if view is None:
        return not_found(request, session)
    return _render(request, session, view)


PREVIEW_ROWS = 100
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif"}
PREVIEW_TEXT = 20_000


def _previews(request: Request, view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """file id -> {"table": (columns, rows of (value, small) pairs)} or {"text": str}."""
    from permits.service import get_terms

    state = get_state(request)
    service = airlock_service(state)
    with state.db.read() as s:
        minimum = get_terms(s, view["permit_id"]).export.min_cell_count
    out: dict[str, dict[str, Any]] = {}
    for f in view["files"]:
        try:
            data = service.quarantine.get(view["id"], f["id"])
            if f["kind"] in ("csv", "tsv", "parquet"):
                table = airlock_checks.read_table(
                    data, f["kind"], service.quarantine.path(view["id"], f["id"]))
                counts = set(airlock_checks.count_columns(table))
                rows = []
                for _, row in table.head(PREVIEW_ROWS).iterrows():
                    cells = []
                    for column in table.columns:
                        value = row[column]
                        small = (str(column) in counts and isinstance(value, int | float)
                                 and value > 0 and sdc.below_threshold(value, minimum))
                        cells.append((value, small))
                    rows.append(cells)
                out[f["id"]] = {"table": ([str(c) for c in table.columns], rows),
                                "minimum": minimum, "total": len(table)}
            elif f["kind"] in IMAGE_TYPES:
                out[f["id"]] = {"image": True}
            elif f["kind"] == "pdf":  # rasterised in a sandbox by the preview route
                why = pdf_preview.available()
                out[f["id"]] = {"pdf": why is None, "why": why}
            elif f["kind"] in ("txt", "md", "json", "svg"):
                out[f["id"]] = {"text": data[:PREVIEW_TEXT].decode("utf-8", "replace")}
        except (OSError, ValueError):
            continue
    return out


def _releases(request: Request, view: dict[str, Any]) -> dict[str, Any]:
    """For reviewers: the permit's earlier released files (request, name, SHA-256, kind,
    date; ``compared`` when a differencing check of this request compared against it) and,
    per file of this request, its differencing check with the cells it flagged."""
    with get_state(request).db.read() as s:
        rows = s.execute(select(ExportRelease, ExportFile.name).join(
            ExportFile, ExportFile.id == ExportRelease.file_id).where(
            ExportRelease.permit_id == view["permit_id"],
            ExportRelease.request_id != view["id"]).order_by(ExportRelease.released_at)).all()
    checks = {f["id"]: next((c for c in f["checks"] if c["name"] == "differencing"), None)
              for f in view["files"]}
    # The service names a released table by its file id (" sheet S" for a workbook's sheet).
    compared = {str(c["name"]).split(" sheet ")[0] for check in checks.values() if check
                for c in (check.get("details") or {}).get("compared", [])}
    flagged = {str((check.get("details") or {}).get("name")).split(" sheet ")[0]
               for check in checks.values() if check and check["outcome"] == "fail"}
    return {
        "earlier": [{"request_id": r.request_id, "name": name, "sha256": r.sha256,
                     "kind": r.kind, "released_at": r.released_at,
                     "compared": r.file_id in compared,
                     "flagged": r.file_id in flagged} for r, name in rows],
        "checks": {fid: c for fid, c in checks.items() if c is not None},
    }


def _render(request: Request, session: Any, view: dict[str, Any], status: int = 200,
            error: str | None = None) -> HTMLResponse:
    principal = session.principal
    can_vote = (Role.HOSPITAL_ADMIN in principal.roles and principal.kind == "user"
                and principal.username != view["requester"]
                and view["state"] == State.IN_REVIEW.value and not view["you_voted"])
    can_download = (Role.RESEARCHER in principal.roles and principal.kind == "user"
                    and view["state"] == State.RELEASED.value)
    reviewer = Role.HOSPITAL_ADMIN in principal.roles and principal.kind == "user"
    return page(request, "export.html", status, session, title="Export request",
                req=view, can_vote=can_vote, can_download=can_download, error=error,
                decisions=DECISIONS, previews=_previews(request, view) if reviewer else {},
                releases=_releases(request, view) if reviewer else None)


@router.post("/console/permits/{permit_id}/exports/{request_id}/vote")
async def vote(request: Request, permit_id: str, request_id: str) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    form = await _form(request, session)
    if form is None:
        return page(request, "error.html", 403, session, title="Refused",
                    message="The form was not sent from this console; reload and try again.")
    session, view = _view(request, permit_id, request_id)
    if session is None or view is None:
        return not_found(request, session)
    decision = form.get("decision")
    comment = (form.get("comment") or "").strip()[:2000] or None
    override = (form.get("override_reason") or "").strip()[:2000] or None
    if decision not in DECISIONS:
        return _render(request, session, view, 400, "Choose approve, reject or return.")
    try:
        airlock_service(get_state(request)).vote(
            session.principal, permit_id, request_id, decision,  # type: ignore[arg-type]
            comment, form.get("shared") == "yes", override)
    except (NotFound, Forbidden):
        return not_found(request, session)
    except (Conflict, InvalidInput) as exc:
        return _render(request, session, view, 409, str(exc))
    return views.redirect(request, f"/console/permits/{permit_id}/exports/{request_id}")


@router.get("/console/permits/{permit_id}/exports/{request_id}/files/{file_id}")
def download(request: Request, permit_id: str, request_id: str, file_id: str) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    if not (_valid_id(permit_id) and _valid_id(request_id) and _valid_id(file_id)):
        return not_found(request, session)
    try:
        found = airlock_service(get_state(request)).download(session.principal, permit_id,
                                                             request_id, file_id)
    except (NotFound, Forbidden):
        return not_found(request, session)
    except Conflict as exc:
        return page(request, "error.html", 409, session, title="Not available",
                    message=str(exc))
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in found.name)[:120] or "file"
    return Response(found.data, media_type="application/octet-stream", headers={
        **views._headers(get_state(request)),
        "Content-Disposition": f'attachment; filename="{safe}"',
        "X-Content-SHA256": found.sha256})


@router.get("/console/permits/{permit_id}/exports/{request_id}/preview/{file_id}")
def preview(request: Request, permit_id: str, request_id: str, file_id: str) -> Response:
    """An image file of a request, or a PDF's first page rasterised on the server in a sandbox
    (:mod:`spe.airlock.pdf_preview`), for its reviewers (hospital admins)."""
    session, view = _view(request, permit_id, request_id)
    if session is None:
        return _login_redirect(request)
    principal = session.principal
    if view is None or Role.HOSPITAL_ADMIN not in principal.roles or principal.kind != "user":
        return not_found(request, session)
    found = next((f for f in view["files"] if f["id"] == file_id), None)
    if found is None or (found["kind"] not in IMAGE_TYPES and found["kind"] != "pdf"):
        return not_found(request, session)
    try:
        data = airlock_service(get_state(request)).quarantine.get(request_id, file_id)
    except OSError:
        return not_found(request, session)
    if airlock_checks.sha256(data) != found["sha256"]:
        return page(request, "error.html", 409, session, title="Withheld",
                    message="The file no longer matches its recorded hash.")
    media = IMAGE_TYPES.get(found["kind"], "image/png")
    if found["kind"] == "pdf":
        png, why = pdf_preview.first_page_png(data)
        if png is None:
            return page(request, "error.html", 409, session, title="No preview",
                        message=why or "No preview.")
        data = png
    return Response(data, media_type=media, headers={
        **views._headers(get_state(request)),
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Content-Disposition": "inline"})


def permit_requests(request: Request, principal: Any, permit_id: str) -> list[dict[str, Any]]:
    """The permit's export requests for its page (empty when the person may not list them)."""
    try:
        return airlock_service(get_state(request)).list_requests(principal, permit_id)
    except (NotFound, Forbidden):
        return []
