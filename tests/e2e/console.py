"""Helpers for the console's browser tests.

A Keycloak started before the console existed imported an older realm file (``keycloak.sh``
re-imports only when it starts); :func:`ensure_console_realm` adds what the console needs, as
``infra/keycloak/realm-spe.json`` declares it (the console client, the access-body groups and the
access-body officers), to the running realm. It changes nothing that is already there, so a
freshly imported realm is left as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REALM_FILE = Path(__file__).resolve().parents[2] / "infra" / "keycloak" / "realm-spe.json"
CONSOLE_CLIENT = "spe-console"
OFFICERS = {"officer-alpha": "hdab-alpha", "officer-beta": "hdab-beta"}


def _realm() -> dict[str, Any]:
    return dict(json.loads(REALM_FILE.read_text()))


def ensure_console_realm(admin: Any) -> None:
    """Add the console client, access-body groups and officers when the realm lacks them."""
    realm = _realm()
    client = next(c for c in realm["clients"] if c["clientId"] == CONSOLE_CLIENT)
    if not admin.get_client_id(CONSOLE_CLIENT):
        admin.create_client(client, skip_exists=True)
    if not _has_group(admin, "/access-bodies"):
        admin.create_group({"name": "access-bodies"}, skip_exists=True)
    parent_id = admin.get_group_by_path("/access-bodies")["id"]
    for body in sorted(set(OFFICERS.values())):
        if not _has_group(admin, f"/access-bodies/{body}"):
            admin.create_group({"name": body}, parent=parent_id, skip_exists=True)
    role = admin.get_realm_role("access-body")
    for user in realm["users"]:
        if user["username"] not in OFFICERS:
            continue
        user_id = admin.get_user_id(user["username"])
        if user_id is None:
            payload = {k: v for k, v in user.items() if k not in ("realmRoles", "groups")}
            user_id = admin.create_user(payload, exist_ok=True)
        admin.assign_realm_roles(user_id, [role])
        group = admin.get_group_by_path(f"/access-bodies/{OFFICERS[user['username']]}")
        admin.group_user_add(user_id, group["id"])


def _has_group(admin: Any, path: str) -> bool:
    try:
        found = admin.get_group_by_path(path)
    except Exception:  # python-keycloak raises on 404
        return False
    return bool(found and found.get("id"))
