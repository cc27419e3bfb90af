"""A workspace must not fill the host's disk through the server log. The single-user server's
stdout and stderr go to ``<workspace>/server.log`` on the host (outside the home's disk quota),
and every process in the sandbox (a kernel, ``os.write(1, ...)``) inherits those descriptors.
Needs root and bubblewrap; everything created is removed even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces import sandbox
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv")),
    reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv",
)

DISK_MB = 16
FLOOD = ["sh", "-c", f"(head -c {3 * DISK_MB * 1024 * 1024} /dev/zero | tr '\\0' x); "
         "echo; echo flood-done"]


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    w = Workspace.provision(
        workspaces_dir=tmp_path / "var" / "workspaces", person="mallory", permit_id="P-1",
        quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=DISK_MB), settings=settings,
        with_network=False, ws_id=f"t{uuid.uuid4().hex[:11]}")
    try:
        yield w
    finally:
        w.destroy(remove_home=True)


def test_output_to_an_inherited_host_file_escapes_the_quota(ws: Workspace) -> None:
    """How the server was started before: the log grows past the workspace's disk quota."""
    log = ws.root / "plain.log"
    with open(log, "ab") as fh:
        assert ws.popen(FLOOD, stdout=fh, stderr=fh).wait(60) == 0
    assert log.stat().st_size > 2 * DISK_MB * 1024 * 1024


def test_server_log_is_bounded(ws: Workspace) -> None:
    log, small = ws.root / "server.log", ws.root / "small.log"
    assert ws.popen_logged(FLOOD, log=log).wait(60) == 0
    assert ws.popen_logged(FLOOD, log=small, max_bytes=1024 * 1024).wait(60) == 0
    _wait_for_end(log)
    _wait_for_end(small)
    assert log.stat().st_size <= sandbox.LOG_MAX_BYTES < DISK_MB * 1024 * 1024
    assert small.stat().st_size <= 1024 * 1024


def _wait_for_end(log: Path) -> None:
    """The copy thread finishes shortly after the process."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().endswith(b"flood-done\n"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{log.name} never got the end of the output")


def test_spawner_starts_the_server_through_the_bounded_log() -> None:
    import inspect

    from workspaces.backend import BubblewrapBackend
    from workspaces.spawner import SandboxSpawner
    source = inspect.getsource(SandboxSpawner.start)
    assert "backend.start(" in source and "stdout=log" not in source
    backend_start = inspect.getsource(BubblewrapBackend.start)
    assert "popen_logged(" in backend_start and "stdout=log" not in backend_start
