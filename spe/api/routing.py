"""The audited route class every SPE router uses.

Contract
--------
* ``APIRouter(route_class=AuditedRoute)``: each route's ``name`` is an
  :class:`~spe.audit.actions.AuditAction` value (``permit.read``, ``dp.query``, ...); a name
  that is not one is refused when the route is declared, so a new router adds its actions to
  the enum first.
* Any refusal of the route (an :class:`~spe.errors.SPEError` or a schema error) that its code
  has not recorded already (``SPEError.audited``) is written to the audit log through
  :func:`spe.audit.record_refusal` with the caller (when known), the action, the permit id
  (the ``permit_id`` path parameter, if any) and the reason: where and what was wrong, never
  the offending values or the body.
* Each route documents the problems it can give: those its dependencies imply (401/403 with
  authentication, 404/422 with path parameters, 413/422 with a body, 422 with any parameter)
  are added to the ``responses`` the router declared (see :func:`implied_problems`), as
  ``application/problem+json`` with the shared ``Problem`` schema.
* The request-body limit is not here: it is enforced once, for every route, by
  ``spe.api.middleware.RequestContextMiddleware``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from spe.api.problems import problem_responses
from spe.api.state import get_state
from spe.audit import AuditAction, record_refusal
from spe.errors import SPEError

#: Dependencies whose presence means the route authenticates its caller.
AUTH_DEPENDENCY_NAMES = frozenset({"get_principal", "_reader", "current_principal",
                                   "reading_principal"})


def _walk(dependant: Dependant) -> list[Dependant]:
    out = [dependant]
    for sub in dependant.dependencies:
        out.extend(_walk(sub))
    return out


def implied_problems(dependant: Dependant) -> set[int]:
    """The problem statuses a route can give by its shape alone."""
    codes: set[int] = set()
    deps = _walk(dependant)
    names = {getattr(d.call, "__name__", "") for d in deps if d.call is not None}
    if names & AUTH_DEPENDENCY_NAMES or any(n.startswith("require_role") for n in names):
        codes |= {401, 403}
    has_path = any(d.path_params for d in deps)
    has_body = any(d.body_params for d in deps)
    has_params = has_path or has_body or any(d.query_params or d.header_params or
                                             d.cookie_params for d in deps)
    if has_path:
        codes.add(404)
    if has_body:
        codes.add(413)
    if has_params:
        codes.add(422)
    return codes


def refusal_details(request: Request, exc: SPEError | RequestValidationError
                    ) -> tuple[int, str, dict[str, Any]]:
    """(status, reason, details) of a refusal: where and why, never the offending values."""
    if isinstance(exc, SPEError):
        status, reason, errors = exc.status, exc.detail, exc.errors
    else:
        status, reason = 422, "The request does not match the schema."
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")}
                  for e in exc.errors()]
    details = {"method": request.method,
               "errors": [{"loc": e.get("loc"), "msg": str(e.get("msg", ""))[:300]}
                          for e in errors[:50]]}
    return status, reason, details


def audit_refusal(request: Request, action: AuditAction | str,
                  exc: SPEError | RequestValidationError) -> None:
    """Record that ``request`` was refused under ``action`` (runs in a worker thread)."""
    from spe.auth.principal import Principal

    found = getattr(request.state, "spe_principal", None)
    principal = found if isinstance(found, Principal) else None
    status, reason, details = refusal_details(request, exc)
    permit_id = request.path_params.get("permit_id")
    record_refusal(
        get_state(request).db, action,
        actor=principal.actor if principal else None,
        role=principal.primary_role() if principal else None,
        reason=reason, status=status, permit_id=permit_id,
        target=permit_id or request.url.path,
        request_id=getattr(request.state, "request_id", None), details=details)


class AuditedRoute(APIRoute):
    """An APIRoute whose refusals are audited under its ``name`` (an ``AuditAction``) and whose
    implied problem responses are documented."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        responses = dict(kwargs.get("responses") or {})
        dependant = get_dependant(path=path, call=endpoint)
        for dep in kwargs.get("dependencies") or ():
            if dep.dependency is not None:
                dependant.dependencies.append(get_dependant(path=path, call=dep.dependency))
        missing = sorted(implied_problems(dependant) - {int(c) for c in responses
                                                        if str(c).isdigit()})
        if missing:
            kwargs["responses"] = {**responses, **problem_responses(*missing)}
        name = str(kwargs.get("name") or getattr(endpoint, "__name__", ""))
        try:
            self.action = AuditAction(name)
        except ValueError:
            raise ValueError(f"route {path}: name {name!r} is not an AuditAction value; "
                             "add the action to spe.audit.actions first") from None
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()
        action = self.action

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except (SPEError, RequestValidationError) as exc:
                if not getattr(exc, "audited", False):
                    await run_in_threadpool(audit_refusal, request, action, exc)
                raise

        return handler
