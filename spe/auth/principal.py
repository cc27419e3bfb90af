"""Typed principals: who is calling, in which roles, under which permit."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal


class Role(StrEnum):
    RESEARCHER = "researcher"
    ACCESS_BODY = "access-body"
    HOSPITAL_ADMIN = "hospital-admin"
    OPERATOR = "operator"


PrincipalKind = Literal["user", "service", "workspace", "system"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    * ``user``: a person logged in through Keycloak (``subject`` is the Keycloak user id,
      ``username`` the login name that permits list as authorised persons).
    * ``service``: an access body's client-credentials token; ``access_body`` names it.
    * ``workspace``: an SPE-minted workspace token bound to (``username``, ``permit_id``,
      ``workspace_id``); it carries the researcher role only. ``address``, when the token is
      bound to its workspace's network address, is the only client address it is accepted
      from (checked by :func:`spe.auth.deps.get_principal`).
    * ``system``: the SPE itself (CLI, schedulers); never built from a request.
    """

    subject: str
    username: str
    kind: PrincipalKind
    roles: frozenset[Role] = field(default_factory=frozenset)
    access_body: str | None = None
    permit_id: str | None = None
    workspace_id: str | None = None
    token_id: str | None = None
    address: str | None = None

    def has(self, role: Role) -> bool:
        return role in self.roles

    @property
    def actor(self) -> str:
        """The name written to the audit log."""
        return self.username

    def primary_role(self) -> str | None:
        for role in (Role.ACCESS_BODY, Role.HOSPITAL_ADMIN, Role.OPERATOR, Role.RESEARCHER):
            if role in self.roles:
                return role.value
        return None


SYSTEM = Principal(subject="system", username="system", kind="system",
                   roles=frozenset({Role.OPERATOR}))


def operator_principal(name: str) -> Principal:
    """The operator acting through the CLI on the SPE host (authenticated by the OS)."""
    return Principal(subject=f"os:{name}", username=name, kind="system",
                     roles=frozenset({Role.OPERATOR}))
