"""An incident freeze on real permits, on SQLite and PostgreSQL: the spawner's permit check
(its poll, every 2 s) refuses the frozen permit, the hub service stops its running servers in
its next round (a loopback hub API), DP queries and airlock steps by the permit's persons are
refused and the open request is kept as it was; another permit goes on; a thaw restores use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from permits.errors import PermitNotUsable
from permits.schemas import PermitCreate
from permits.service import PermitService, get_terms
from spe.airlock.service import AirlockService
from spe.audit import incident
from spe.auth.principal import Principal, Role
from spe.config import Settings
from spe.db import Database
from spe.dp.api import authorise
from spe.errors import Conflict
from tests.integration.test_permit_service import ALPHA, body, register_dataset
from tests.integration.test_workspace_lifecycle import HubApi
from workspaces import lifecycle
from workspaces.hub_service import HubService
from workspaces.settings import WorkspaceSettings
from workspaces.spawner import check_permit

ALICE = Principal(subject="al", username="alice", kind="user",
                  roles=frozenset({Role.RESEARCHER}))
WHO = {"actor": "op", "role": "operator"}


def test_freeze_stops_servers_and_refuses_queries_and_airlock(db: Database,
                                                              tmp_path: Path) -> None:
    register_dataset(db)
    svc = PermitService(db)
    frozen = svc.issue(ALPHA, PermitCreate.model_validate(body(persons=["alice"]))).permit_id
    other = svc.issue(ALPHA, PermitCreate.model_validate(
        body(persons=["alice"], reference="0002/2026/FI"))).permit_id
    settings = Settings(data_dir=tmp_path / "d", database_url=db.url)
    airlock = AirlockService(db, settings)
    req = airlock.create(ALICE, frozen, "Table 1", [])
    for pid in (frozen, other):  # the workspace records the hub service maps servers by
        lifecycle.record_state(db, person="alice", permit_id=pid, state="running")

    incident.freeze(db, permit_id=frozen, reason="suspected exfiltration", **WHO)

    with pytest.raises(PermitNotUsable, match="frozen"):
        check_permit(db, "alice", frozen)  # the spawner's poll: its server is torn down
    assert check_permit(db, "alice", other).permit_id == other
    with db.read() as s:
        terms, other_terms = get_terms(s, frozen), get_terms(s, other)
    assert terms.frozen and not terms.usable and terms.status.value == "active"
    with pytest.raises(PermitNotUsable):
        authorise(ALICE, terms)  # DP queries (the API's rule) refused
    authorise(ALICE, other_terms)
    with pytest.raises(Conflict, match="frozen"):
        airlock.create(ALICE, frozen, "Table 2", [])
    for step in (airlock.submit, airlock.withdraw):
        with pytest.raises(Conflict, match="frozen"):
            step(ALICE, frozen, req["id"])
    assert airlock.get(ALICE, frozen, req["id"])["state"] == "draft"  # kept for evidence

    names = {pid: lifecycle.server_name(pid) for pid in (frozen, other)}
    hub = HubApi({"alice": [names[frozen], names[other]], "bob": []})
    (settings.data_dir / "hub").mkdir(parents=True, exist_ok=True)
    service = HubService(settings, WorkspaceSettings(), db, hub.url, "test-token")
    try:
        assert asyncio.run(service.stop_frozen_once()) == [("alice", names[frozen])]
        assert hub.servers == {"alice": [names[other]], "bob": []}
        assert asyncio.run(service.stop_frozen_once()) == []
        incident.freeze(db, permit_id=None, reason="breach at the hospital", **WHO)
        assert asyncio.run(service.stop_frozen_once()) == [("alice", names[other])]
        incident.thaw(db, permit_id=None, reason="contained", **WHO)
        incident.thaw(db, permit_id=frozen, reason="cleared by the access body", **WHO)
        hub.servers["alice"].append(names[frozen])
        assert asyncio.run(service.stop_frozen_once()) == []  # thawed: nothing stopped
    finally:
        hub.close()
    assert check_permit(db, "alice", frozen).permit_id == frozen
    assert airlock.withdraw(ALICE, frozen, req["id"])["state"] == "withdrawn"
