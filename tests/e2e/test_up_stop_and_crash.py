"""`spe up` stops within 5 s leaving nothing, and reconciles after a ``kill -9`` of everything.

One `spe up` (the real command, as a subprocess on test ports with a temp data dir) runs a
workspace; SIGINT must end it within 5 s with no namespace, nftables table, home mount or
running record left. A second start resumes the state (the permit still works); a workspace is
started, then every process of this data dir is killed with SIGKILL; the third start must
reconcile (audited), and the workspace must start at the first try.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.db import Database
from tests.e2e.stack import Stack
from tests.integration.test_hub_keycloak import _database, _issue, _login, _spawn
from tests.integration.test_hub_keycloak import pytestmark as hub_marks
from tests.integration.test_permit_service import register_dataset
from workspaces import accounts, network
from workspaces.models import WorkspaceRow
from workspaces.reconcile import reconcile

pytestmark = hub_marks


def _up(st: Stack) -> subprocess.Popen[bytes]:
    log = open(st.data_dir / "up.log", "ab")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "spe"), "up", "--no-keycloak", "--persons", "200",
         "--hub-url", st.hub_url], env={**os.environ, **st.env}, stdout=log, stderr=log,
        start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (st.data_dir / "up.log").read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if (httpx.get(f"{st.hub_url}/hub/login", timeout=2).status_code == 200
                    and httpx.get(f"{st.api_url}/healthz", timeout=2).status_code == 200):
                return proc
        time.sleep(0.5)
    raise TimeoutError((st.data_dir / "up.log").read_text()[-3000:])


def _ours(data_dir: Path) -> list[int]:
    """Processes whose environment names this data dir (everything this `spe up` started)."""
    mark = f"SPE_DATA_DIR={data_dir}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            with contextlib.suppress(OSError):
                if mark in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
    return pids


def _tables() -> str:
    return subprocess.run(["nft", "list", "tables", "inet"], capture_output=True,
                          text=True).stdout


@pytest.fixture
def stack(tmp_path: Path, keycloak_url: str) -> Iterator[Stack]:
    gen = _database(tmp_path)
    url = next(gen)
    db = Database(url)
    db.upgrade()
    register_dataset(db)
    db.dispose()
    st = Stack(data_dir=tmp_path / "var", database_url=url, keycloak_url=keycloak_url)
    st.data_dir.mkdir()
    try:
        yield st
    finally:
        for pid in _ours(st.data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        db = Database(url)  # a failed run leaves nothing mounted either
        reconcile(db, st.data_dir, cgroup_parent=st.cgroup_parent, include_live=True)
        db.dispose()
        with contextlib.suppress(StopIteration):
            next(gen)


def test_stop_within_5s_and_reconcile_after_kill9(
        stack: Stack, client_headers: Callable[[str], dict[str, str]],
        user_headers: Callable[[str], dict[str, str]]) -> None:
    st = stack
    up = _up(st)
    pid = _issue(st, client_headers("hdab-alpha"), ["alice"])
    ws_id = accounts.workspace_id("alice", pid)
    net = network.WorkspaceNetwork(ws_id, "", "", 0, ())
    _spawn(st, _login(st, "alice"), "alice", pid)
    assert net.exists() and net.table in _tables()

    t0 = time.monotonic()
    up.send_signal(signal.SIGINT)
    up.wait(30)
    took = time.monotonic() - t0
    assert took < 5, f"spe up took {took:.1f} s to stop"
    time.sleep(0.5)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in _ours(st.data_dir)}
    assert left == {}, "processes of this data dir left after Ctrl-C"
    assert not net.exists() and net.table not in _tables()
    assert not (st.data_dir / "workspaces" / ws_id / "disk").is_mount()
    db = Database(st.database_url)
    with db.read() as session:
        row = session.get(WorkspaceRow, ws_id)
        assert row is not None and row.state == "stopped", row and row.state

    up = _up(st)  # resumes: the same permit and dataset still work
    _spawn(st, _login(st, "alice"), "alice", pid)
    assert net.exists()
    for p in _ours(st.data_dir):  # kill -9 of everything
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    up.wait(10)
    assert net.exists(), "the crash should have left the namespace behind"

    up = _up(st)
    with db.read() as session:
        audited = session.scalars(select(AuditEntry).where(
            AuditEntry.action == "workspace.reconcile", AuditEntry.target == ws_id)).all()
        assert audited, (st.data_dir / "up.log").read_text()[-3000:]
        row = session.get(WorkspaceRow, ws_id)
        assert row is not None and row.state == "stopped"
    listed = httpx.get(f"{st.api_url}/v1/workspaces", headers=user_headers("op"), timeout=30)
    assert listed.status_code == 200, listed.text
    assert {w["id"]: w["state"] for w in listed.json()}[ws_id] == "stopped"  # the truth
    assert not net.exists()
    _spawn(st, _login(st, "alice"), "alice", pid)  # first try: asserts 201/202 and ready
    with db.read() as session:
        row = session.get(WorkspaceRow, ws_id)
        assert row is not None and row.state == "running"
    up.send_signal(signal.SIGINT)
    up.wait(30)
    assert not net.exists()
    db.dispose()
