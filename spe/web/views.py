"""The console's pages and the public permit register.

Contract
--------
* ``/register`` (HTML) and ``/register.json``: the public permit register (no login; see
  ``spe.web.register``: no personal data).
* ``/console/...``: pages for logged-in people (``spe.web.auth``); without a session a page
  redirects to the Keycloak login and comes back.
* Every page authorises through the same functions as the API: permits through
  ``PermitService.view``/``list_permits``/``versions``/``transition`` (``permits.policy``: a
  permit the person may not see is 404, never 403), the audit browser through the API's
  ``read_audit`` (its scoping and its audit entry), datasets and workspaces for hospital admins
  and operators like ``/v1/datasets`` and ``/v1/workspaces``.
* Every form carries the session's CSRF token; a form without it (or from another origin) is
  refused (403) and audited as ``web.refused``. Suspend, resume and revoke go through a
  confirmation page and ``PermitService.transition`` (audited there as permit changes).
* Every response carries the headers of ``spe.web.security`` (strict CSP, no script at all).
* Errors never echo what was sent: a page names only what the person may know.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select

from permits.service import get_terms
from permits.states import Action
from spe.api.deps import PERMIT_ID_PATTERN, permit_service
from spe.api.state import AppState, get_state
from spe.audit import AuditAction, AuditEvent, Outcome, record
from spe.auth.principal import Principal, Role
from spe.budget.ledger import from_eps_units
from spe.budget.models import BudgetCharge
from spe.errors import Conflict, Forbidden, InvalidInput, NotAuthenticated, NotFound, SPEError
from spe.web import auth, plots, register, security

logger = logging.getLogger("spe.web")

HERE = Path(__file__).parent
COOKIE = "spe_console"
LOGIN_COOKIE = "spe_console_login"
ACTIONS = {"suspend": Action.SUSPEND, "resume": Action.RESUME, "revoke": Action.REVOKE}
_MAX_FORM = 16_384

templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                        autoescape=select_autoescape(["html"]), trim_blocks=True,
                        lstrip_blocks=True)

router = APIRouter(include_in_schema=False)


# Rendering -----------------------------------------------------------------------------------
def _secure(state: AppState) -> bool:
    return state.settings.api_base_url.startswith("https://")


def _headers(state: AppState) -> dict[str, str]:
    return security.headers(state.settings)


def page(request: Request, name: str, status: int = 200,
         session: auth.ConsoleSession | None = None, **context: Any) -> HTMLResponse:
    state = get_state(request)
    body = templates.get_template(name).render(
        session=session, person=session.principal if session else None,
        csrf=session.csrf if session else "", roles=_role_names(session), **context)
    return HTMLResponse(body, status_code=status, headers=_headers(state))


def _role_names(session: auth.ConsoleSession | None) -> set[str]:
    return {r.value for r in session.principal.roles} if session else set()


def redirect(request: Request, url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=_headers(get_state(request)))


def not_found(request: Request, session: auth.ConsoleSession | None) -> HTMLResponse:
    return page(request, "error.html", 404, session, title="Not found",
                message="There is no such page, or you may not open it.")


def _audit(state: AppState, principal: Principal | None, action: AuditAction, *,
           outcome: Outcome = Outcome.SUCCESS, reason: str | None = None,
           permit_id: str | None = None, details: dict[str, Any] | None = None) -> None:
    with state.db.write() as s:
        record(s, AuditEvent(action=action, actor=principal.actor if principal else "anonymous",
                             role=principal.primary_role() if principal else None,
                             permit_id=permit_id, outcome=outcome, reason=reason,
                             details=details or {}))


def _session(request: Request) -> auth.ConsoleSession | None:
    return auth.load(get_state(request), request.cookies.get(COOKIE))


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return redirect(request, f"/console/login?next={quote(target, safe='')}")


async def _form(request: Request, session: auth.ConsoleSession) -> dict[str, str] | None:
    """The posted form when its CSRF token and origin are right; None (refusal audited)."""
    state = get_state(request)
    raw = await request.body()
    fields = {k: v[0] for k, v in parse_qs(raw[:_MAX_FORM].decode("utf-8", "replace"),
                                           max_num_fields=20).items()}
    request_origin = f"{request.url.scheme}://{request.url.netloc}"
    ok = security.same_origin(request.headers.get("origin"), state.settings.api_base_url,
                              request_origin) and security.check_csrf(session.csrf,
                                                                      fields.get("csrf"))
    if not ok:
        _audit(state, session.principal, AuditAction.WEB_REFUSED, outcome=Outcome.REFUSED,
               reason="form without a valid CSRF token or from another origin",
               details={"path": request.url.path})
        return None
    return fields


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/console") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console"


# Public: the register and the stylesheet -------------------------------------------------------
@router.get("/console/static/console.css")
def stylesheet(request: Request) -> Response:
    return Response((HERE / "static" / "console.css").read_bytes(), media_type="text/css",
                    headers={**_headers(get_state(request)), "Cache-Control": "max-age=300"})


@router.get("/register")
def register_page(request: Request, access_body: str | None = None) -> HTMLResponse:
    state = get_state(request)
    body = access_body if access_body and len(access_body) <= 64 else None
    return page(request, "register.html", session=_session(request), title="Permit register",
                entries=register.entries(state.db, body))


@router.get("/register.json")
def register_json(request: Request, access_body: str | None = None) -> JSONResponse:
    state = get_state(request)
    body = access_body if access_body and len(access_body) <= 64 else None
    return JSONResponse({"permits": register.entries(state.db, body)},
                        headers=_headers(state))


# Login and logout ------------------------------------------------------------------------------
@router.get("/console/login")
def login(request: Request, next: str | None = None) -> Response:  # noqa: A002 - query name
    state = get_state(request)
    try:
        token, url = auth.begin_login(state, _safe_next(next))
    except NotAuthenticated as exc:
        return page(request, "error.html", 503, title="Login unavailable", message=str(exc))
    response = redirect(request, url)
    response.set_cookie(LOGIN_COOKIE, token, max_age=auth.LOGIN_SECONDS, httponly=True,
                        secure=_secure(state), samesite="lax", path="/console/callback")
    return response


@router.get("/console/callback")
def callback(request: Request, code: str | None = None, state: str | None = None) -> Response:
    app_state = get_state(request)
    try:
        token, session, next_path = auth.finish_login(
            app_state, request.cookies.get(LOGIN_COOKIE), code, state)
    except NotAuthenticated as exc:
        _audit(app_state, None, AuditAction.WEB_LOGIN, outcome=Outcome.REFUSED, reason=str(exc))
        return page(request, "error.html", 401, title="Login failed", message=str(exc))
    _audit(app_state, session.principal, AuditAction.WEB_LOGIN,
           details={"kind": session.principal.kind})
    response = redirect(request, _safe_next(next_path))
    response.delete_cookie(LOGIN_COOKIE, path="/console/callback")
    # Lax, not Strict: the first page after login is reached through a redirect chain that
    # started at Keycloak (another site in production), where browsers withhold Strict cookies.
    # Cross-site posts still carry no cookie, and every form needs its CSRF token anyway.
    response.set_cookie(COOKIE, token, max_age=app_state.settings.console_session_seconds,
                        httponly=True, secure=_secure(app_state), samesite="lax", path="/")
    return response


@router.post("/console/logout")
async def logout(request: Request) -> Response:
    state = get_state(request)
    session = _session(request)
    if session is None:
        return redirect(request, "/console/logged-out")
    if await _form(request, session) is None:
        return page(request, "error.html", 403, session, title="Refused",
                    message="The form was not sent from this console; reload and try again.")
    url = auth.end(state, session)
    _audit(state, session.principal, AuditAction.WEB_LOGOUT)
    response = redirect(request, url)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/console/logged-out")
def logged_out(request: Request) -> HTMLResponse:
    return page(request, "logged_out.html", title="Logged out")


# Permits ---------------------------------------------------------------------------------------
def _budget_rows(state: AppState, permit_ids: list[str]) -> dict[str, float]:
    if not permit_ids:
        return {}
    from spe.budget.models import BudgetAccount

    with state.db.read() as s:
        return {a.permit_id: from_eps_units(a.spent_epsilon_units) for a in s.execute(
            select(BudgetAccount).where(BudgetAccount.permit_id.in_(permit_ids))).scalars()}


@router.get("/console")
def home(request: Request, status: str | None = None) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    state = get_state(request)
    permits: list[Any] = []
    if session.principal.roles & {Role.ACCESS_BODY, Role.RESEARCHER, Role.HOSPITAL_ADMIN}:
        try:
            permits = permit_service(state).list_permits(session.principal, limit=200).items
        except SPEError:
            permits = []
    spent = _budget_rows(state, [p.id for p in permits])
    return page(request, "home.html", session=session, title="Console", permits=permits,
                spent=spent)


def _charges(state: AppState, permit_id: str) -> list[tuple[datetime, float]]:
    with state.db.read() as s:
        rows = s.execute(select(BudgetCharge.created_at, BudgetCharge.epsilon_units)
                         .where(BudgetCharge.permit_id == permit_id)
                         .order_by(BudgetCharge.created_at)).all()
    total, points = 0, []
    for created, units in rows:
        total += int(units)
        points.append((created, from_eps_units(total)))
    return points


@router.get("/console/permits/{permit_id}")
def permit_page(request: Request, permit_id: str) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    state = get_state(request)
    if not _valid_id(permit_id):
        return not_found(request, session)
    service = permit_service(state)
    try:
        permit = service.view(session.principal, permit_id).public()
        versions = service.versions(session.principal, permit_id)
    except (NotFound, Forbidden):
        return not_found(request, session)
    with state.db.read() as s:
        cap = get_terms(s, permit_id).budget.epsilon
    points = _charges(state, permit_id)
    now = datetime.now(UTC)
    start = min(permit.valid_from, points[0][0]) if points else permit.valid_from
    end = max(min(permit.valid_until, now), start + timedelta(days=1))
    per_day = sorted(Counter(t.date().isoformat() for t, _ in points).items())
    svg = plots.budget_svg(points, cap, start, end)
    can_act = session.principal.access_body == permit.access_body and \
        session.principal.kind == "service"
    from spe.web.exports import permit_requests

    return page(request, "permit.html", session=session, title=f"Permit {permit.reference}",
                permit=permit, versions=versions, svg=svg, cap=cap,
                exports=(exports := permit_requests(request, session.principal, permit_id)),
                export_states=sorted(Counter(r["state"] for r in exports).items()),
                spent=points[-1][1] if points else 0.0, per_day=per_day, can_act=can_act,
                actions=[a for a in ACTIONS if _allowed(a, permit.status.value)])


def _allowed(action: str, status: str) -> bool:
    return {"suspend": status == "active", "resume": status == "suspended",
            "revoke": status in ("active", "suspended")}[action]


def _valid_id(permit_id: str) -> bool:
    import re

    return 0 < len(permit_id) <= 64 and re.fullmatch(PERMIT_ID_PATTERN, permit_id) is not None


@router.get("/console/permits/{permit_id}/{action}")
def confirm_page(request: Request, permit_id: str, action: str) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    if action not in ACTIONS or not _valid_id(permit_id):
        return not_found(request, session)
    try:
        permit = permit_service(get_state(request)).view(session.principal, permit_id).public()
    except (NotFound, Forbidden):
        return not_found(request, session)
    if session.principal.access_body != permit.access_body:
        return not_found(request, session)
    return page(request, "confirm.html", session=session, title=f"{action.title()} permit",
                permit=permit, action=action)


@router.post("/console/permits/{permit_id}/{action}")
async def act(request: Request, permit_id: str, action: str) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    form = await _form(request, session)
    if form is None:
        return page(request, "error.html", 403, session, title="Refused",
                    message="The form was not sent from this console; reload and try again.")
    if action not in ACTIONS or not _valid_id(permit_id):
        return not_found(request, session)
    reason = (form.get("reason") or "").strip()
    if not reason or len(reason) > 500 or form.get("confirm") != "yes":
        return page(request, "error.html", 400, session, title="Not done",
                    message="Give a reason (at most 500 characters) and tick the confirmation.")
    try:
        permit_service(get_state(request)).transition(session.principal, permit_id,
                                                      ACTIONS[action], reason=reason)
    except (NotFound, Forbidden):
        return not_found(request, session)
    except (Conflict, InvalidInput) as exc:
        return page(request, "error.html", 409, session, title="Not done", message=str(exc))
    return redirect(request, f"/console/permits/{permit_id}")


# Hospital admins -------------------------------------------------------------------------------
_ADMINS = {Role.HOSPITAL_ADMIN, Role.OPERATOR}


@router.get("/console/datasets")
def datasets_page(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    if not session.principal.roles & _ADMINS:
        return not_found(request, session)
    from spe.datasets.registry import list_datasets

    return page(request, "datasets.html", session=session, title="Datasets",
                datasets=list_datasets(get_state(request).db))


@router.get("/console/workspaces")
def workspaces_page(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    if not session.principal.roles & _ADMINS:
        return not_found(request, session)
    from workspaces.api import list_gpus, list_workspaces

    db = get_state(request).db
    running = [w for w in list_workspaces(session.principal, db) if w.state == "running"]
    return page(request, "workspaces.html", session=session, title="Workspaces",
                workspaces=running, gpus=list_gpus(session.principal, db))


_AUDIT_FILTERS = ("action", "actor", "permit_id", "outcome", "since", "until")


@router.get("/console/audit")
def audit_page(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    from spe.api.routers.audit import read_audit

    state = get_state(request)
    params = request.query_params
    filters = {k: params.get(k) or None for k in _AUDIT_FILTERS}
    try:
        cursor = int(params.get("cursor") or 0)
        since = datetime.fromisoformat(filters["since"]) if filters["since"] else None
        until = datetime.fromisoformat(filters["until"]) if filters["until"] else None
        if (since and since.tzinfo is None) or (until and until.tzinfo is None):
            raise ValueError
        if filters["outcome"] not in (None, "success", "refused", "failure"):
            raise ValueError
        if any(len(v) > 255 for v in filters.values() if v) or not 0 <= cursor < 2**62:
            raise ValueError
    except ValueError:
        return page(request, "error.html", 400, session, title="Not shown",
                    message="A filter is not valid: times need a zone "
                    "(2026-01-01T00:00:00+00:00), outcome is success, refused or failure.")
    try:
        result = read_audit(state, session.principal, action=filters["action"],
                            actor=filters["actor"], permit_id=filters["permit_id"],
                            outcome=filters["outcome"],  # type: ignore[arg-type]
                            since=since, until=until, cursor=cursor, limit=50)
    except Forbidden:
        return not_found(request, session)
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in filters.items() if v)
    return page(request, "audit.html", session=session, title="Audit log",
                entries=result.items, next_cursor=result.next_cursor, filters=filters,
                query=query)


@router.get("/console/audit/verify")
def audit_verify_page(request: Request) -> Response:
    """Verify the whole hash chain now (hospital admins and operators; audited)."""
    session = _session(request)
    if session is None:
        return _login_redirect(request)
    if not session.principal.roles & _ADMINS:
        return not_found(request, session)
    from spe.audit import verify_chain

    state = get_state(request)
    with state.db.read() as s:
        report = verify_chain(s)
    _audit(state, session.principal, AuditAction.AUDIT_READ,
           details={"verify_chain": True, "ok": report.ok, "entries": report.entries})
    return page(request, "verify.html", session=session, title="Audit chain verification",
                report=report)


# The export review pages register their routes on this router.
from spe.web import exports as _exports  # noqa: E402, F401
