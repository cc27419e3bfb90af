"""FastAPI dependencies for authentication and role checks.

Contract (other packages code against it):

* ``get_principal``: reads ``Authorization: Bearer <token>``, validates it (a Keycloak access
  token for the realm, or an SPE workspace token) and returns the caller's
  :class:`~spe.auth.principal.Principal`. A missing or invalid token raises
  :class:`spe.errors.NotAuthenticated` (401 problem) saying what is wrong, never echoing the
  token.
* A workspace token bound to its workspace's network address (``Principal.address``) is
  refused (401) when the request's client address is another one. The address is the TCP
  peer's, never a forwarding header.
* ``require_role(*roles)``: a dependency returning the Principal when it holds at least one of
  ``roles``; otherwise :class:`spe.errors.Forbidden` (403) naming the roles required.

Usage::

    @router.get("/v1/things")
    def things(principal: Principal = Depends(require_role(Role.RESEARCHER))) -> ...:
        ...
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from fastapi import Request

from spe.api.state import get_state
from spe.audit import context as audit_context
from spe.auth.principal import Principal, Role
from spe.auth.validator import get_validator
from spe.errors import Forbidden, NotAuthenticated

_SCHEME = "bearer"


def bearer_token(request: Request) -> str:
    """The raw bearer token of ``request``; NotAuthenticated when absent or malformed."""
    header = request.headers.get("authorization")
    if not header:
        raise NotAuthenticated(
            "This endpoint needs an access token: send 'Authorization: Bearer <token>'."
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != _SCHEME or not token:
        raise NotAuthenticated(
            "The Authorization header must use the Bearer scheme: 'Authorization: Bearer <token>'."
        )
    return token


def get_principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller of this request (401 when none)."""
    cached = getattr(request.state, "spe_principal", None)
    if isinstance(cached, Principal):
        return cached
    token = bearer_token(request)
    state = get_state(request)
    principal = get_validator(state).validate(token)
    if principal.kind == "workspace" and principal.address is not None:
        check_address(principal, request.client.host if request.client else None)
    request.state.spe_principal = principal
    if principal.kind == "workspace":
        audit_context.note_workspace(principal.workspace_id)
    return principal


def check_address(principal: Principal, client: str | None) -> None:
    """Refuse a workspace token used from an address other than its workspace's."""
    try:
        same = client is not None and principal.address is not None and (
            ipaddress.ip_address(client) == ipaddress.ip_address(principal.address))
    except ValueError:
        same = False
    if not same:
        raise NotAuthenticated(
            "This workspace token is bound to its workspace's network address and is refused "
            "from anywhere else; use it from inside the workspace."
        )


def require_role(*roles: Role) -> Callable[[Request], Principal]:
    """A dependency that returns the caller when they hold any of ``roles`` (else 403)."""
    if not roles:
        raise ValueError("require_role needs at least one role")
    wanted = frozenset(roles)
    names = ", ".join(sorted(r.value for r in wanted))

    def _dependency(request: Request) -> Principal:
        principal = get_principal(request)
        if principal.roles & wanted:
            return principal
        raise Forbidden(
            f"This action requires the role {names}; the caller "
            f"({principal.kind} {principal.username!r}) does not have it."
            if len(wanted) == 1
            else f"This action requires one of the roles {names}; the caller "
            f"({principal.kind} {principal.username!r}) has none of them."
        )

    _dependency.__name__ = f"require_role_{'_'.join(sorted(r.name.lower() for r in wanted))}"
    return _dependency
