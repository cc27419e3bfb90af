"""Workspace lifecycle outside a spawn: retention after a permit ends (with a clock), the
hub service's permit-event handling, and the Ray-aware idle check, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from permits.service import PermitService
from permits.states import Action
from permits.terms import ComputeQuota
from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.config import Settings
from spe.db import Database
from spe.db.base import utcnow
from tests.integration.test_permit_service import ALPHA, issue, register_dataset
from workspaces import accounts, cgroups, lifecycle
from workspaces.hub_service import HubService
from workspaces.models import WorkspaceRow
from workspaces.settings import WorkspaceSettings


@pytest.fixture
def svc(db: Database) -> PermitService:
    register_dataset(db)
    return PermitService(db)


def _workspace(settings: Settings, db: Database, pid: str, person: str = "alice") -> Path:
    lifecycle.record_state(db, person=person, permit_id=pid, state="stopped")
    home = settings.data_dir / "workspaces" / accounts.workspace_id(person, pid) / "home"
    home.mkdir(parents=True)
    (home / "analysis.ipynb").write_text("{}")
    return home


def _audits(db: Database, action: str) -> list[AuditEntry]:
    with db.read() as s:
        return list(s.execute(select(AuditEntry).where(AuditEntry.action == action)
                              .order_by(AuditEntry.seq)).scalars())


def test_retention_deletes_after_the_period_with_an_audited_record(
        svc: PermitService, db: Database, settings: Settings) -> None:
    pid = issue(svc, persons=["alice"])
    home = _workspace(settings, db, pid)
    svc.transition(ALPHA, pid, Action.REVOKE, reason="end of project")
    ended = utcnow()
    assert lifecycle.schedule_deletion(db, pid, ended_at=ended, retention_days=180,
                                       reason="permit revoked") == [
        accounts.workspace_id("alice", pid)]
    # earliest deadline wins, nothing audited twice
    assert lifecycle.schedule_deletion(db, pid, ended_at=ended + timedelta(days=3),
                                       retention_days=180, reason="again") == []
    assert lifecycle.purge_due(db, settings.data_dir, now=ended + timedelta(days=179)) == []
    assert home.exists()
    deleted = lifecycle.purge_due(db, settings.data_dir, now=ended + timedelta(days=181))
    assert deleted == [accounts.workspace_id("alice", pid)]
    assert not home.parent.exists()
    entry = _audits(db, "workspace.data_delete")[-1]
    assert entry.permit_id == pid and entry.details["bytes"] == 2
    assert entry.details["deadline"].startswith(str((ended + timedelta(days=180)).date()))
    with db.read() as s:
        assert s.get(WorkspaceRow, deleted[0]).state == "deleted"  # type: ignore[union-attr]
        verify_chain(s)
    assert lifecycle.purge_due(db, settings.data_dir, now=ended + timedelta(days=400)) == []


def test_hub_service_schedules_from_events_and_spares_active_permits(
        svc: PermitService, db: Database, settings: Settings) -> None:
    ended_pid = issue(svc, persons=["alice"], reference="R-ended", retention_days=30)
    live_pid = issue(svc, persons=["alice"], reference="R-live")
    _workspace(settings, db, ended_pid)
    live_home = _workspace(settings, db, live_pid)
    svc.transition(ALPHA, ended_pid, Action.SUSPEND, reason="check")
    svc.transition(ALPHA, ended_pid, Action.REVOKE, reason="misuse")
    (settings.data_dir / "hub").mkdir(parents=True)
    service = HubService(settings, WorkspaceSettings(), db,
                         "http://127.0.0.1:9/hub/api", "unused")

    async def no_servers() -> list[tuple[str, str, dict[str, Any]]]:
        return []  # no hub in this test: the event handling is what is tested

    service.servers = no_servers  # type: ignore[method-assign]
    assert asyncio.run(service.handle_events()) >= 4  # issued x2, suspended, revoked
    assert asyncio.run(service.handle_events()) == 0  # the cursor persisted
    with db.read() as s:
        rows = {r.permit_id: r for r in s.execute(select(WorkspaceRow)).scalars()}
    assert rows[ended_pid].delete_after is not None and rows[live_pid].delete_after is None
    later = utcnow() + timedelta(days=31)
    assert service.retention_once(later) == [accounts.workspace_id("alice", ended_pid)]
    assert live_home.exists()


def test_schedule_ended_catches_expiry_without_an_event(
        svc: PermitService, db: Database, settings: Settings) -> None:
    pid = issue(svc, persons=["alice"], retention_days=10)
    _workspace(settings, db, pid)
    service = HubService(settings, WorkspaceSettings(), db,
                         "http://127.0.0.1:9/hub/api", "unused")
    assert service.schedule_ended(utcnow()) == []
    with db.write() as session:  # a row naming no permit must not stop the round
        session.add(WorkspaceRow(id="ws-orphan", person="bob", permit_id="", unix_user="x",
                                 state="stopped"))
    after_expiry = utcnow() + timedelta(days=366)  # body() permits run for 365 days
    assert service.schedule_ended(after_expiry) == [accounts.workspace_id("alice", pid)]


@pytest.mark.parametrize("days", [183, 1, 0])
def test_retention_is_the_permits_own_to_the_day(
        svc: PermitService, db: Database, settings: Settings, days: int) -> None:
    # A permit stating 183 days was scheduled as 180 (a setting overrode it): no more.
    pid = issue(svc, persons=["alice"], retention_days=days)
    home = _workspace(settings, db, pid)
    svc.transition(ALPHA, pid, Action.REVOKE, reason="end of project")
    service = HubService(settings, WorkspaceSettings(), db, "http://127.0.0.1:9/hub/api",
                         "unused")

    async def no_servers() -> list[tuple[str, str, dict[str, Any]]]:
        return []

    service.servers = no_servers  # type: ignore[method-assign]
    (settings.data_dir / "hub").mkdir(parents=True, exist_ok=True)
    asyncio.run(service.handle_events())
    ws_id = accounts.workspace_id("alice", pid)
    with db.read() as s:
        row = s.get(WorkspaceRow, ws_id)
        assert row is not None and row.delete_after is not None
        revoked_at = row.delete_after - timedelta(days=days)
    assert _audits(db, "workspace.data_delete_schedule")[-1].details["retention_days"] == days
    # the day before the deadline: kept; the deadline: deleted.
    assert service.retention_once(revoked_at + timedelta(days=days) - timedelta(seconds=1)) == []
    assert home.exists()
    assert service.retention_once(revoked_at + timedelta(days=days)) == [ws_id]
    assert not home.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups")
def test_ray_tasks_running_reads_worker_titles_in_the_workspace_cgroup() -> None:
    parent = f"spe-test-{uuid.uuid4().hex[:6]}"
    ws_id = f"t{uuid.uuid4().hex[:11]}"
    cg = cgroups.create(ws_id, ComputeQuota(memory_mb=256), parent=parent)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        found = lifecycle.find_cgroup(ws_id, parent)
        assert found is not None and lifecycle.ray_tasks_running(found) == []
        for title in ("ray::IDLE", "ray::train_model"):
            procs.append(subprocess.Popen(cg.enter_argv(
                [shutil.which("bash") or "bash", "-c", f"exec -a '{title}' sleep 60"])))
        deadline = time.monotonic() + 5
        while len(found.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # let exec -a set the titles
        assert lifecycle.ray_tasks_running(found) == ["ray::train_model"]
    finally:
        cg.kill_all()
        for p in procs:
            p.wait(5)
        cg.destroy()
    assert lifecycle.find_cgroup(ws_id, parent) is None


class HubApi:
    """A loopback HTTP endpoint answering the two hub REST calls the service makes (list
    users with their servers, delete a server), recording the deletions: the service's real
    HTTP client runs against it. The real hub is exercised in test_hub_keycloak."""

    def __init__(self, servers: dict[str, list[str]],
                 models: dict[tuple[str, str], dict[str, Any]] | None = None) -> None:
        import http.server
        import threading

        self.servers = servers
        self.models = models or {}
        self.deleted: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _send(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                import json

                assert self.headers["Authorization"] == "token test-token"
                users = [{"name": u, "servers": {
                    n: outer.models.get((u, n), {"ready": True}) for n in names}}
                    for u, names in outer.servers.items()]
                self._send(200, json.dumps(users).encode())

            def do_DELETE(self) -> None:
                from urllib.parse import unquote

                parts = self.path.split("/")  # /hub/api/users/<user>/servers/<name>
                user, name = parts[4], parts[6]
                outer.deleted.append((unquote(user), unquote(name)))
                outer.servers[unquote(user)].remove(unquote(name))
                self._send(204)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hub/api"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _store(settings: Settings) -> None:
    import duckdb

    settings.store_dir.mkdir(parents=True)
    con = duckdb.connect(str(settings.store_dir / "demo.duckdb"))
    con.execute("CREATE TABLE person (person_id BIGINT, year_of_birth BIGINT, "
                "gender_concept_id BIGINT)")
    con.execute("INSERT INTO person VALUES (1, 1950, 8507), (2, 1960, 8532), (3, 1970, 8507)")
    con.close()


def test_amendments_stop_removed_persons_narrowing_stops_all_and_sync_the_extract(
        svc: PermitService, db: Database, settings: Settings) -> None:
    import pyarrow.parquet as pq

    from permits.schemas import PermitUpdate
    from workspaces.extracts import extracts_dir

    _store(settings)
    pid = issue(svc, persons=["alice", "bob"], access_mode="pseudonymised",
                pseudonymisation_justification="linkage needs row level data")
    other = issue(svc, persons=["bob"], reference="R-other")
    name = lifecycle.server_name(pid)
    hub = HubApi({"alice": [name], "bob": [name, lifecycle.server_name(other)]})
    (settings.data_dir / "hub").mkdir(parents=True, exist_ok=True)
    service = HubService(settings, WorkspaceSettings(), db, hub.url, "test-token")
    extract = extracts_dir(settings) / pid.replace("-", "_") / "demo" / "person.parquet"
    try:
        assert asyncio.run(service.handle_events()) == 2  # issued x2: the extract is built
        assert pq.read_schema(extract).names == ["person_id", "year_of_birth"]
        assert hub.deleted == []
        # a column added (widening): the extract is rebuilt; no server stopped (control)
        etag = svc.get(ALPHA, pid).etag
        svc.amend(ALPHA, pid, PermitUpdate.model_validate({"datasets": [
            {"dataset": "demo", "tables": {"person": ["person_id", "year_of_birth",
                                                      "gender_concept_id"]}}]}), etag)
        assert asyncio.run(service.handle_events()) == 1
        assert set(pq.read_schema(extract).names) == {"gender_concept_id", "person_id",
                                                      "year_of_birth"}
        assert hub.deleted == []
        # alice removed: her server for this permit stops, bob's (and his other one) stay
        svc.amend(ALPHA, pid, PermitUpdate(persons=["bob"]), svc.get(ALPHA, pid).etag)
        assert asyncio.run(service.handle_events()) == 1
        assert hub.deleted == [("alice", name)]
        assert hub.servers == {"alice": [], "bob": [name, lifecycle.server_name(other)]}
        # a column removed (narrowing): every server of the permit stops (bob's), not his
        # server of another permit
        svc.amend(ALPHA, pid, PermitUpdate.model_validate({"datasets": [
            {"dataset": "demo", "tables": {"person": ["person_id", "gender_concept_id"]}}]}),
            svc.get(ALPHA, pid).etag)
        assert asyncio.run(service.handle_events()) == 1
        assert hub.deleted == [("alice", name), ("bob", name)]
        assert hub.servers == {"alice": [], "bob": [lifecycle.server_name(other)]}
        # pseudonymised -> dp_only (narrowing): the extract is removed, servers stopped, audited
        hub.servers["bob"].append(name)
        svc.amend(ALPHA, pid, PermitUpdate.model_validate({"access_mode": "dp_only"}),
                  svc.get(ALPHA, pid).etag)
        assert asyncio.run(service.handle_events()) == 1
        assert not extract.parent.parent.exists()
        assert hub.deleted == [("alice", name), ("bob", name), ("bob", name)]
    finally:
        hub.close()
    amended = _audits(db, "workspace.permit_amended")
    assert [(e.details["stopped_servers_of"], e.details["extract"], e.details["narrowed"])
            for e in amended] == [
        ([], "rebuilt", []), (["alice"], "kept", []),
        (["bob"], "rebuilt", ["columns of demo.person removed"]),
        (["bob"], "removed", ["access mode pseudonymised -> dp_only"])]
    assert [e.permit_id for e in _audits(db, "workspace.extract_remove")] == [pid]
    assert len(_audits(db, "workspace.extract_build")) == 3
    with db.read() as s:
        verify_chain(s)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups")
def test_cull_measures_cpu_time_not_process_names(
        svc: PermitService, db: Database, settings: Settings) -> None:
    idle_pid = issue(svc, persons=["alice"], reference="R-idle")
    busy_pid = issue(svc, persons=["alice"], reference="R-busy")
    forged_pid = issue(svc, persons=["alice"], reference="R-forged")
    fresh_pid = issue(svc, persons=["alice"], reference="R-fresh")
    pids = (idle_pid, busy_pid, forged_pid, fresh_pid)
    for pid in pids:
        lifecycle.record_state(db, person="alice", permit_id=pid, state="running")
    now = utcnow()
    stale = (now - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    names = {pid: lifecycle.server_name(pid) for pid in pids}
    models = {("alice", names[pid]): {"ready": True, "last_activity": stale}
              for pid in (idle_pid, busy_pid, forged_pid)}
    models[("alice", names[fresh_pid])] = {"ready": True, "last_activity": now.isoformat()}
    hub = HubApi({"alice": list(names.values())}, models)
    ws = WorkspaceSettings(cull_idle_seconds=3600, cull_busy_cpu_percent=20,
                           cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    busy_ws = accounts.workspace_id("alice", busy_pid)
    forged_ws = accounts.workspace_id("alice", forged_pid)
    busy_cg = cgroups.create(busy_ws, ComputeQuota(memory_mb=256), parent=ws.cgroup_parent)
    forged_cg = cgroups.create(forged_ws, ComputeQuota(memory_mb=256), parent=ws.cgroup_parent)
    if busy_cg.cpu_seconds() is None:
        busy_cg.destroy()
        forged_cg.destroy()
        hub.close()
        pytest.skip("no CPU accounting for cgroups on this machine")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # real work in one workspace; in the other, a sleeping process titled as a busy Ray
        # worker (the workspace controls its process names: the old rule spared it forever)
        procs.append(subprocess.Popen(busy_cg.enter_argv(["/bin/sh", "-c", "while :; do :; done"])))
        procs.append(subprocess.Popen(forged_cg.enter_argv(
            [shutil.which("bash") or "bash", "-c", "exec -a 'ray::train_model' sleep 60"])))
        deadline = time.monotonic() + 5
        while lifecycle.ray_tasks_running(forged_cg) != ["ray::train_model"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        service = HubService(settings, ws, db, hub.url, "test-token")
        # round 1: no cgroup (nothing runs) is idle; the others are measured first
        assert asyncio.run(service.cull_once(now)) == [("alice", names[idle_pid])]
        time.sleep(1.0)
        # round 2: the forged title is culled, the CPU work is not
        assert asyncio.run(service.cull_once(now)) == [("alice", names[forged_pid])]
        procs[0].kill()
        procs[0].wait(5)
        time.sleep(1.0)
        # round 3: the work ended: culled too
        assert asyncio.run(service.cull_once(now)) == [("alice", names[busy_pid])]
        assert hub.servers == {"alice": [names[fresh_pid]]}
    finally:
        hub.close()
        for cg in (busy_cg, forged_cg):
            cg.kill_all()
        for p in procs:
            p.wait(5)
        busy_cg.destroy()
        forged_cg.destroy()
    culls = [(e.target, e.outcome, e.reason) for e in _audits(db, "workspace.cull")]
    assert culls == [
        (accounts.workspace_id("alice", idle_pid), "success", "idle"),
        (busy_ws, "refused", "busy (CPU)"),
        (forged_ws, "success", "idle"),
        (busy_ws, "success", "idle")]
    refused = next(e for e in _audits(db, "workspace.cull") if e.outcome == "refused")
    assert refused.details["cpu_percent"] >= 20
    with db.read() as s:
        verify_chain(s)


def test_servers_past_their_maximum_lifetime_are_stopped(
        svc: PermitService, db: Database, settings: Settings) -> None:
    old_pid = issue(svc, persons=["alice"], reference="R-old")
    young_pid = issue(svc, persons=["alice"], reference="R-young")
    for pid in (old_pid, young_pid):
        lifecycle.record_state(db, person="alice", permit_id=pid, state="running")
    now = utcnow()
    names = {pid: lifecycle.server_name(pid) for pid in (old_pid, young_pid)}
    active = now.isoformat()
    models = {("alice", names[old_pid]): {"ready": True, "last_activity": active,
                                          "started": (now - timedelta(days=8)).isoformat()},
              ("alice", names[young_pid]): {"ready": True, "last_activity": active,
                                            "started": (now - timedelta(days=6)).isoformat()}}
    hub = HubApi({"alice": list(names.values())}, models)
    try:
        service = HubService(settings, WorkspaceSettings(), db, hub.url, "test-token")
        assert WorkspaceSettings().max_server_lifetime_seconds == 7 * 24 * 3600
        assert asyncio.run(service.cull_once(now)) == [("alice", names[old_pid])]
        # control: with no maximum, an active server runs on
        hub.servers["alice"].append(names[old_pid])
        service = HubService(settings, WorkspaceSettings(max_server_lifetime_seconds=None), db,
                             hub.url, "test-token")
        assert asyncio.run(service.cull_once(now)) == []
    finally:
        hub.close()
    entry = _audits(db, "workspace.cull")[0]
    assert entry.reason == "maximum lifetime" and entry.details["age_seconds"] >= 8 * 86400
