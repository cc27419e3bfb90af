"""Keycloak group membership that follows a permit, as the permits service needs it.

``PermitGroups`` is the interface the service calls, always *outside* its database transaction:

* ``missing_users(usernames)``: the usernames Keycloak does not know (empty list: all known).
* ``provision(permit_id, usernames)``: create the permit's group with exactly these members.
* ``sync(permit_id, usernames)``: make the group's members exactly these.
* ``remove(permit_id)``: delete the group (idempotent: absent is fine).

Any failure to reach Keycloak is raised as :class:`spe.errors.ServiceUnavailable` (503), so a
Keycloak outage refuses the request before anything is written.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from spe.config import Settings


class PermitGroups(Protocol):
    def missing_users(self, usernames: Sequence[str]) -> list[str]: ...

    def provision(self, permit_id: str, usernames: Sequence[str]) -> None: ...

    def sync(self, permit_id: str, usernames: Sequence[str]) -> None: ...

    def remove(self, permit_id: str) -> None: ...


class KeycloakPermitGroups:
    """``PermitGroups`` on the real Keycloak, through :mod:`spe.auth.groups` (python-keycloak).

    One admin session per app, created on first use (so building the app needs no Keycloak).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._groups: Any = None
        self._lock = threading.Lock()

    @property
    def _impl(self) -> Any:
        with self._lock:
            if self._groups is None:
                from spe.auth.groups import PermitGroups as KeycloakGroups

                self._groups = KeycloakGroups(self.settings)
            return self._groups

    def missing_users(self, usernames: Sequence[str]) -> list[str]:
        return sorted(self._impl.users_exist(usernames))

    def provision(self, permit_id: str, usernames: Sequence[str]) -> None:
        self._impl.sync(permit_id, usernames, create=True)

    def sync(self, permit_id: str, usernames: Sequence[str]) -> None:
        self._impl.sync(permit_id, usernames, create=True)

    def remove(self, permit_id: str) -> None:
        self._impl.remove(permit_id)
