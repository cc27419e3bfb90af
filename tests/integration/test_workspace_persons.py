"""A person who loses the researcher role or is disabled in Keycloak loses their servers and
workspace tokens within 10 s (issue 10, item 6), against the real Keycloak; the hub's REST
API is the loopback stand-in of test_workspace_lifecycle (the real hub is exercised in
test_hub_keycloak). Control: a researcher in good standing keeps everything.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from permits.service import PermitService
from spe.auth.models import WorkspaceGrant
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from tests.integration.test_permit_service import issue, register_dataset
from tests.integration.test_workspace_lifecycle import HubApi
from workspaces import accounts, lifecycle
from workspaces.hub_service import HubService
from workspaces.settings import WorkspaceSettings


@pytest.fixture
def kc_user(keycloak_admin: Any) -> Iterator[str]:
    name = f"kc-{uuid.uuid4().hex[:8]}"
    uid = keycloak_admin.create_user({"username": name, "enabled": True,
                                      "email": f"{name}@example.org", "firstName": "K",
                                      "lastName": "C", "emailVerified": True})
    keycloak_admin.assign_realm_roles(uid, [keycloak_admin.get_realm_role("researcher")])
    try:
        yield name
    finally:
        keycloak_admin.delete_user(uid)


def _live_tokens(db: Database, username: str) -> int:
    with db.read() as s:
        return len(s.execute(select(WorkspaceGrant).where(
            WorkspaceGrant.username == username,
            WorkspaceGrant.revoked_at.is_(None))).scalars().all())


@pytest.mark.parametrize("change", ["disabled", "role removed"])
def test_person_loses_servers_and_tokens_within_10s(
        change: str, db: Database, settings: Settings, keycloak_url: str,
        keycloak_admin: Any, kc_user: str) -> None:
    register_dataset(db)
    pid = issue(PermitService(db), persons=["alice", kc_user])
    name = lifecycle.server_name(pid)
    with db.write() as session:
        for user in (kc_user, "alice"):
            mint_workspace_token(session, settings, subject=user, username=user,
                                 permit_id=pid, workspace_id=accounts.workspace_id(user, pid))
    hub = HubApi({kc_user: [name], "alice": [name]})
    kc_settings = settings.model_copy(update={
        "keycloak_url": keycloak_url,
        "keycloak_admin_user": os.environ.get("SPE_TEST_KEYCLOAK_ADMIN_USER", "admin"),
        "keycloak_admin_password": SecretStr(
            os.environ.get("SPE_TEST_KEYCLOAK_ADMIN_PASSWORD", "admin"))})
    service = HubService(kc_settings, WorkspaceSettings(), db, hub.url, "test-token")
    try:
        assert asyncio.run(service.check_persons_once()) == []  # both in good standing
        uid = keycloak_admin.get_user_id(kc_user)
        if change == "disabled":
            keycloak_admin.update_user(uid, {"enabled": False})
        else:
            keycloak_admin.delete_realm_roles_of_user(
                uid, [keycloak_admin.get_realm_role("researcher")])
        changed_at = time.monotonic()
        # the service's own cadence: a check every person_check_seconds
        deadline = changed_at + 10
        while hub.servers[kc_user]:
            assert time.monotonic() < deadline, "servers still running 10 s after the change"
            asyncio.run(service.check_persons_once())
            if hub.servers[kc_user]:
                time.sleep(WorkspaceSettings().person_check_seconds)
        assert time.monotonic() - changed_at < 10
        assert hub.deleted == [(kc_user, name)]
        assert _live_tokens(db, kc_user) == 0
        # Control: alice keeps her server and her token.
        assert hub.servers["alice"] == [name] and _live_tokens(db, "alice") == 1
    finally:
        hub.close()
    reason = "person disabled in Keycloak" if change == "disabled" else "researcher role removed"
    from spe.audit.models import AuditEntry

    with db.read() as s:
        culls = s.execute(select(AuditEntry).where(
            AuditEntry.action == "workspace.cull")).scalars().all()
    assert [(c.reason, c.details["person"]) for c in culls] == [(reason, kc_user)]
