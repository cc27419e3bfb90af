"""Who may do what with permits: ``check_*`` raise, ``can_*`` answer with a bool.

* Issue and change: only access bodies, i.e. principals of kind ``service`` holding the
  ``access-body`` role and naming their ``access_body``; each only its own permits.
* Read: the owning access body; hospital admins (all permits); researchers the permits that
  name them (a workspace token only the permit it is bound to). Everyone else: 403.
* A permit the caller may not see is reported as 404, never 403, so its existence is not
  revealed.
* Use (query its data, run a workspace under it): :func:`can_use` / :func:`check_use`, the one
  answer to "may this person use this permit now", for the DP API and the spawner alike: the
  person is named in the permit's newest version and the permit is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from permits.errors import NotNamedInPermit, PermitNotUsable
from permits.terms import PermitTerms
from spe.auth.principal import Principal, Role
from spe.errors import Forbidden, NotFound


def can_manage(principal: Principal) -> bool:
    """Whether the caller is an access body (may issue permits and change its own)."""
    return (principal.kind == "service" and Role.ACCESS_BODY in principal.roles
            and bool(principal.access_body))


def check_manage(principal: Principal) -> None:
    if not can_manage(principal):
        raise Forbidden("Only access bodies (client-credentials tokens with the access-body "
                        "role) may issue or change permits.")


def can_read_permits(principal: Principal) -> bool:
    return (can_manage(principal) or Role.HOSPITAL_ADMIN in principal.roles
            or Role.RESEARCHER in principal.roles)


def check_read_permits(principal: Principal) -> None:
    if not can_read_permits(principal):
        raise Forbidden("Reading permits requires the access-body, hospital-admin or "
                        "researcher role.")


def can_see(principal: Principal, permit_id: str, access_body: str,
            persons: frozenset[str] | set[str]) -> bool:
    """Whether the caller may read this permit."""
    if can_manage(principal) and principal.access_body == access_body:
        return True
    if Role.HOSPITAL_ADMIN in principal.roles and principal.kind in ("user", "system"):
        return True
    if Role.RESEARCHER in principal.roles and principal.username in persons:
        return principal.kind != "workspace" or principal.permit_id == permit_id
    return False


def _not_found(permit_id: str) -> NotFound:
    return NotFound(f"No permit {permit_id} visible to the caller.")


def check_see(principal: Principal, permit_id: str, access_body: str,
              persons: frozenset[str] | set[str]) -> None:
    if not can_see(principal, permit_id, access_body, persons):
        raise _not_found(permit_id)


def can_change(principal: Principal, access_body: str) -> bool:
    return can_manage(principal) and principal.access_body == access_body


def check_change(principal: Principal, permit_id: str, access_body: str) -> None:
    """Only the issuing access body changes a permit; anyone else gets 404 (or 403 if they
    are not an access body at all)."""
    check_manage(principal)
    if not can_change(principal, access_body):
        raise _not_found(permit_id)


@dataclass(frozen=True)
class ListScope:
    """Which permits a caller's list may contain."""

    kind: Literal["all", "access_body", "person"]
    value: str | None = None
    permit_id: str | None = None


def list_scope(principal: Principal) -> ListScope:
    check_read_permits(principal)
    if can_manage(principal):
        return ListScope("access_body", principal.access_body)
    if Role.HOSPITAL_ADMIN in principal.roles and principal.kind in ("user", "system"):
        return ListScope("all")
    if principal.kind == "workspace":
        return ListScope("person", principal.username, principal.permit_id)
    return ListScope("person", principal.username)


def can_read_events(principal: Principal) -> bool:
    return bool(principal.roles & {Role.OPERATOR, Role.HOSPITAL_ADMIN}) and principal.kind in (
        "user", "system", "service")


def check_read_events(principal: Principal) -> None:
    if not can_read_events(principal):
        raise Forbidden("The permit event stream is for operators and hospital admins.")


def can_use(person: str, terms: PermitTerms) -> bool:
    """Whether ``person`` may use the permit now: named in it, and the permit is active."""
    return terms.names(person) and terms.usable


def check_use(person: str, terms: PermitTerms, *, hide_unnamed: bool = False) -> None:
    """Raise unless ``person`` may use the permit now (:func:`can_use`).

    A person the permit does not name gets :class:`NotNamedInPermit` (403), or with
    ``hide_unnamed`` the 404 an unknown permit gets (a caller who may not see the permit must
    not learn it exists). A named person gets :class:`PermitNotUsable` (403) while the permit
    is pending, suspended, revoked or expired.
    """
    if not terms.names(person):
        if hide_unnamed:
            raise _not_found(terms.permit_id)
        raise NotNamedInPermit(f"{person} is not named in permit {terms.permit_id}.")
    if not terms.usable:
        raise PermitNotUsable(f"The permit is {terms.state_text}; using it needs an active "
                              "permit.")
