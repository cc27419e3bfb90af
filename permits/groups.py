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

from collections.abc import Sequence
from typing import Protocol


class PermitGroups(Protocol):
    def missing_users(self, usernames: Sequence[str]) -> list[str]: ...

    def provision(self, permit_id: str, usernames: Sequence[str]) -> None: ...

    def sync(self, permit_id: str, usernames: Sequence[str]) -> None: ...

    def remove(self, permit_id: str) -> None: ...
