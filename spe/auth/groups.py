"""Keycloak groups for permits, managed through python-keycloak's admin API.

Contract:

* A permit's group is named ``permit-<permit_id>`` (top level in the realm); JupyterHub sees
  membership through the ``groups`` claim.
* No function here ever creates, enables or changes a user account. Usernames are checked first;
  any that Keycloak does not know make the call raise :class:`spe.errors.InvalidInput` listing
  them (``errors`` has one entry per unknown username), before anything is changed.
* :func:`provision_permit_group` (permit issued) creates the group if absent and sets its
  members to exactly ``usernames``; :func:`sync_permit_group` (permit amended) does the same and
  reports what changed; :func:`remove_permit_group` (permit revoked/expired) deletes the group
  (idempotent). :func:`users_exist` returns the set of unknown usernames.
* Admin credentials come from settings (``keycloak_admin_user``/``keycloak_admin_password``,
  authenticated in the ``master`` realm); when Keycloak cannot be reached or refuses the admin,
  :class:`spe.errors.ServiceUnavailable` is raised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from keycloak import KeycloakAdmin, KeycloakOpenIDConnection
from keycloak.exceptions import KeycloakError, KeycloakGetError

from spe.config import Settings, get_settings
from spe.errors import InvalidInput, ServiceUnavailable

GROUP_PREFIX = "permit-"
_PERMIT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@dataclass(frozen=True)
class GroupChange:
    group: str
    group_id: str
    added: frozenset[str] = field(default_factory=frozenset)
    removed: frozenset[str] = field(default_factory=frozenset)
    members: frozenset[str] = field(default_factory=frozenset)


def group_name(permit_id: str) -> str:
    if not _PERMIT_ID.match(permit_id):
        raise InvalidInput("A permit id must be 1-64 letters, digits, '.', '_', ':' or '-'.")
    return GROUP_PREFIX + permit_id


def admin_client(settings: Settings | None = None) -> KeycloakAdmin:
    """A python-keycloak admin client for the SPE realm, with credentials from settings."""
    settings = settings or get_settings()
    connection = KeycloakOpenIDConnection(
        server_url=settings.keycloak_base_url,
        username=settings.keycloak_admin_user,
        password=settings.keycloak_admin_password.get_secret_value(),
        realm_name=settings.keycloak_realm,
        user_realm_name="master",
        client_id="admin-cli",
        verify=True,
        timeout=30,
    )
    return KeycloakAdmin(connection=connection)


class PermitGroups:
    """Permit-group operations on one realm (one admin session, reused)."""

    def __init__(self, settings: Settings | None = None,
                 admin: KeycloakAdmin | None = None) -> None:
        self.settings = settings or get_settings()
        self._admin = admin

    @property
    def admin(self) -> KeycloakAdmin:
        if self._admin is None:
            self._admin = admin_client(self.settings)
        return self._admin

    # -- lookups ----------------------------------------------------------------------------
    def user_ids(self, usernames: Iterable[str]) -> tuple[dict[str, str], set[str]]:
        """(username -> user id for known users, set of unknown usernames)."""
        known: dict[str, str] = {}
        unknown: set[str] = set()
        for name in sorted(set(usernames)):
            if not name or len(name) > 255:
                unknown.add(name)
                continue
            users = _call(lambda n=name: self.admin.get_users(
                {"username": n, "exact": True, "briefRepresentation": True}))
            match = [u for u in users if str(u.get("username", "")).lower() == name.lower()]
            if match:
                known[name] = str(match[0]["id"])
            else:
                unknown.add(name)
        return known, unknown

    def users_exist(self, usernames: Iterable[str]) -> set[str]:
        """The usernames Keycloak does not know (empty set: all exist)."""
        return self.user_ids(usernames)[1]

    def find_group(self, permit_id: str) -> dict[str, Any] | None:
        name = group_name(permit_id)
        try:
            group = self.admin.get_group_by_path(f"/{name}")
        except KeycloakGetError as exc:
            if exc.response_code == 404:
                return None
            raise _unavailable(exc) from exc
        except KeycloakError as exc:
            raise _unavailable(exc) from exc
        return group if isinstance(group, dict) and group.get("id") else None

    def members(self, group_id: str) -> dict[str, str]:
        """username -> user id of the group's members."""
        rows = _call(lambda: self.admin.get_group_members(group_id, {"briefRepresentation": True}))
        return {str(r["username"]): str(r["id"]) for r in rows}

    # -- changes ----------------------------------------------------------------------------
    def sync(self, permit_id: str, usernames: Iterable[str], *, create: bool) -> GroupChange:
        name = group_name(permit_id)
        wanted = set(usernames)
        known, unknown = self.user_ids(wanted)
        if unknown:
            listed = ", ".join(sorted(unknown))
            raise InvalidInput(
                f"These persons have no account in the SPE's identity provider: {listed}. "
                "Accounts are not created from permits; ask the SPE to register them first.",
                errors=[{"loc": ["authorised_persons"], "msg": "unknown person",
                         "username": u} for u in sorted(unknown)],
            )
        group = self.find_group(permit_id)
        if group is None:
            if not create:
                raise InvalidInput(f"Permit {permit_id} has no group to amend; provision it first.")
            _call(lambda: self.admin.create_group({"name": name}, skip_exists=True))
            group = self.find_group(permit_id)
            if group is None:
                raise ServiceUnavailable(f"Keycloak did not create group {name}.")
        gid = str(group["id"])
        current = self.members(gid)
        current_lower = {u.lower(): uid for u, uid in current.items()}
        wanted_lower = {u.lower() for u in wanted}
        added = {u for u in known if u.lower() not in current_lower}
        removed = {u for u in current if u.lower() not in wanted_lower}
        for user in sorted(added):
            _call(lambda uid=known[user]: self.admin.group_user_add(uid, gid))
        for user in sorted(removed):
            _call(lambda uid=current[user]: self.admin.group_user_remove(uid, gid))
        return GroupChange(group=name, group_id=gid, added=frozenset(added),
                           removed=frozenset(removed), members=frozenset(wanted))

    def remove(self, permit_id: str) -> bool:
        group = self.find_group(permit_id)
        if group is None:
            return False
        _call(lambda: self.admin.delete_group(str(group["id"])))
        return True


def _unavailable(exc: Exception) -> ServiceUnavailable:
    code = getattr(exc, "response_code", None)
    return ServiceUnavailable(
        f"The identity provider's admin API failed (status {code}); permit groups were not "
        "changed. Check that Keycloak runs and the SPE's admin credentials are valid."
    )


def _call(fn: Any) -> Any:
    try:
        return fn()
    except KeycloakError as exc:
        raise _unavailable(exc) from exc


def provision_permit_group(permit_id: str, usernames: Iterable[str], *,
                           settings: Settings | None = None) -> GroupChange:
    """Permit issued: create ``permit-<id>`` with exactly these members (no accounts created)."""
    return PermitGroups(settings).sync(permit_id, usernames, create=True)


def sync_permit_group(permit_id: str, usernames: Iterable[str], *,
                      settings: Settings | None = None) -> GroupChange:
    """Permit amended: make the group's members exactly ``usernames``."""
    return PermitGroups(settings).sync(permit_id, usernames, create=True)


def remove_permit_group(permit_id: str, *, settings: Settings | None = None) -> bool:
    """Permit revoked or expired: delete its group. False when it did not exist."""
    return PermitGroups(settings).remove(permit_id)


def users_exist(usernames: Iterable[str], *, settings: Settings | None = None) -> set[str]:
    """The usernames Keycloak does not know (empty: all exist). Creates nothing."""
    return PermitGroups(settings).users_exist(usernames)
