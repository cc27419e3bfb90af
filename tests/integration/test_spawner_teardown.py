"""The spawner's teardown when the hub stops a server twice at once (seen in CI).

After a permit is revoked, the hub service asks the hub to stop the server while the hub's
own poll finds the server gone: two ``stop`` calls, and the hub clears the spawner's state
(``clear_state``: the permit, so the workspace id) as soon as the second one returns. The
teardown of the first then recorded the stop under permit '' and workspace ``alice-``: the
audit entry of the permit never came, the workspace's tokens and GPUs were looked up under the
wrong id, and a workspace row with an empty permit was left behind.

The spawner here is the real one with its real database work; the sandbox backend is a stand-in
whose ``destroy`` waits until the test lets it go (a real sandbox is torn down in well under a
second: the stand-in holds the race window open so the order is certain).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select

from permits.service import PermitService
from spe.audit.models import AuditEntry
from spe.config import Settings
from spe.db import Database
from tests.integration.test_permit_service import issue, register_dataset
from workspaces import accounts, lifecycle
from workspaces.models import WorkspaceRow
from workspaces.spawner import SandboxSpawner


class _HeldDestroy:
    name = "held"

    def __init__(self) -> None:
        self.entered, self.release, self.destroyed = (threading.Event(), threading.Event(),
                                                      [])

    def destroy(self, ws: Any) -> None:
        self.entered.set()
        assert self.release.wait(30)
        self.destroyed.append(ws.ws_id)


def test_concurrent_stops_record_one_stop_under_the_right_permit(
        db: Database, tmp_path: Path) -> None:
    register_dataset(db)
    pid = issue(PermitService(db))
    settings = Settings(data_dir=tmp_path / "var", database_url=db.url)
    lifecycle.record_state(db, person="alice", permit_id=pid, state="running")
    ws_id = accounts.workspace_id("alice", pid)

    class Spawner(SandboxSpawner):
        @property
        def spe_settings(self) -> Settings:
            return settings

        @property
        def name(self) -> str:  # the hub's ORM gives it; here no hub
            return lifecycle.server_name(pid)

    backend = _HeldDestroy()
    spawner = Spawner(user=SimpleNamespace(name="alice", url="/user/alice/",
                                           base_url="/user/alice/"))
    spawner._permit_id, spawner._backend = pid, backend  # type: ignore[assignment]
    spawner._ws = SimpleNamespace(ws_id=ws_id)
    spawner._proc = SimpleNamespace(poll=lambda: None)

    async def race() -> None:
        first = asyncio.ensure_future(spawner.stop())  # the hub service's DELETE
        assert await asyncio.to_thread(backend.entered.wait, 10)
        assert await spawner.poll() == 0  # the hub's poll: the server is gone
        second = asyncio.ensure_future(spawner.stop())  # the hub stops it again
        await asyncio.sleep(0.2)
        assert not second.done(), "a second stop returned before the sandbox was gone"
        spawner.clear_state()  # what the hub does once a stop returns
        backend.release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 30)

    asyncio.run(race())
    assert backend.destroyed == [ws_id]
    with db.read() as s:
        stops = list(s.execute(select(AuditEntry).where(
            AuditEntry.action == "workspace.stop")).scalars())
        rows = list(s.execute(select(WorkspaceRow)).scalars())
    assert [(e.permit_id, e.target) for e in stops] == [(pid, ws_id)]
    assert [(r.permit_id, r.state) for r in rows] == [(pid, "stopped")]


def test_a_teardown_after_one_finished_records_nothing(db: Database, tmp_path: Path) -> None:
    """The poll's permit check returns after a stop finished and the hub cleared the state:
    no second stop under an empty permit."""
    register_dataset(db)
    pid = issue(PermitService(db))
    settings = Settings(data_dir=tmp_path / "var", database_url=db.url)

    class Spawner(SandboxSpawner):
        @property
        def spe_settings(self) -> Settings:
            return settings

    backend = _HeldDestroy()
    backend.release.set()
    spawner = Spawner(user=SimpleNamespace(name="alice", url="/user/alice/",
                                           base_url="/user/alice/"))
    spawner._permit_id, spawner._backend = pid, backend  # type: ignore[assignment]
    spawner._ws = SimpleNamespace(ws_id=accounts.workspace_id("alice", pid))

    async def late() -> None:
        await spawner.stop()
        spawner.clear_state()
        await spawner._teardown_once("No permit .")  # what the late poll would do

    asyncio.run(late())
    with db.read() as s:
        stops = list(s.execute(select(AuditEntry.permit_id).where(
            AuditEntry.action == "workspace.stop")).scalars())
    assert stops == [pid]
