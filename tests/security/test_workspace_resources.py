"""Admission control of shared resources (issue 10, item 5): the cgroup holding all workspaces
has memory and pids limits of its own, so the services keep running when every workspace is at
its quota; workspace processes are the OOM killer's first choice; no core dumps.

Each limit is shown biting with the control on and not biting with it off (the same workload,
a parent without the limit). Needs root, bubblewrap and cgroups; everything is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces import cgroups
from workspaces.sandbox import WORKSPACE_OOM_SCORE_ADJ, Workspace
from workspaces.settings import WorkspaceSettings

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv")),
    reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv",
)

HOG = ("import sys\nblocks = []\nfor _ in range(int(sys.argv[1])):\n"
       "    b = bytearray(1024 * 1024); b[::4096] = b'x' * len(b[::4096]); blocks.append(b)\n"
       "print('held', len(blocks))\n")
THREADS = ("import sys, threading, time\nn = 0\ntry:\n"
           "    for _ in range(int(sys.argv[1])):\n"
           "        threading.Thread(target=time.sleep, args=(3,), daemon=True).start(); n += 1\n"
           "except RuntimeError:\n    pass\nprint('threads', n)\n")

Make = Callable[..., Workspace]


@pytest.fixture
def make_ws(tmp_path: Path) -> Iterator[Make]:
    made: list[Workspace] = []

    def make(**limits: int | None) -> Workspace:
        settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(),
                                     cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}",
                                     disk_quota=False, **limits)  # type: ignore[arg-type]
        ws = Workspace.provision(
            workspaces_dir=tmp_path / "ws", person="mallory", permit_id="P-res",
            quota=ComputeQuota(cpus=1.0, memory_mb=512, disk_mb=64), settings=settings,
            with_network=False, ws_id=f"t{uuid.uuid4().hex[:11]}")
        made.append(ws)
        return ws

    yield make
    for ws in made:
        ws.destroy(remove_home=True)


def test_parent_memory_limit_bounds_all_workspaces(make_ws: Make) -> None:
    # the workspace's own quota (512 MB) allows 300 MB; the parent (all workspaces) does not.
    limited = make_ws(workspaces_memory_mb=160)
    out = limited.run(["python3", "-c", HOG, "300"], timeout=120)
    assert out.returncode != 0 and "held" not in out.stdout  # OOM-killed at the parent limit
    control = make_ws(workspaces_memory_mb=4096)
    out = control.run(["python3", "-c", HOG, "300"], timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["held", "300"], out.stderr


def test_parent_pids_limit_bounds_all_workspaces(make_ws: Make) -> None:
    limited = make_ws(workspaces_pids_max=40)
    out = limited.run(["python3", "-c", THREADS, "100"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[1]) < 40  # the parent's 40, not the workspace's 512
    control = make_ws(workspaces_pids_max=8192)
    out = control.run(["python3", "-c", THREADS, "100"], timeout=60)
    assert out.stdout.split() == ["threads", "100"], out.stderr


def test_no_core_dumps_and_workspaces_die_first(make_ws: Make) -> None:
    ws = make_ws()
    probe = ("ulimit -H -c; ulimit -S -c; cat /proc/self/oom_score_adj; "
             "(ulimit -S -c unlimited 2>/dev/null && echo raised) || echo refused; "
             "(echo -1000 > /proc/self/oom_score_adj) 2>/dev/null && echo lowered "
             "|| echo kept")
    out = ws.run(["sh", "-c", probe])
    assert out.stdout.split() == ["0", "0", str(WORKSPACE_OOM_SCORE_ADJ), "refused", "kept"]
    # Control: the same account outside the sandbox may raise its core limit and keeps the
    # host's OOM score, which the sandbox replaced.
    host = subprocess.run(
        ["setpriv", f"--reuid={ws.account.uid}", f"--regid={ws.account.gid}", "--clear-groups",
         "sh", "-c", "ulimit -S -c 1024 && echo raised; cat /proc/self/oom_score_adj"],
        capture_output=True, text=True, timeout=30, check=False, cwd="/")
    if "raised" not in host.stdout:
        pytest.skip("this host's hard core limit is 0 already: the control cannot differ")
    assert host.stdout.split()[1] != str(WORKSPACE_OOM_SCORE_ADJ)


def test_services_protect_themselves() -> None:
    out = subprocess.run(
        ["python3", "-c", "from workspaces import cgroups; print(cgroups.protect_service(), "
         "open('/proc/self/oom_score_adj').read())"],
        capture_output=True, text=True, timeout=30, check=False,
        cwd=str(Path(__file__).resolve().parents[2]),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    applied, score = out.stdout.split()
    assert int(score) < WORKSPACE_OOM_SCORE_ADJ
    if applied == "False":
        pytest.skip("this kernel refuses lowering oom_score_adj (services stay at 0)")
    assert int(score) == cgroups.SERVICE_OOM_SCORE_ADJ < 0


def test_parent_io_limit_throttles_workspace_writes(make_ws: Make) -> None:
    # Direct I/O: charged to the cgroup on cgroup v1 and v2 alike (buffered writes are
    # charged on v2 only). 16 MB at 4 MB/s take about 4 s; unthrottled, well under 2 s.
    write = ["sh", "-c", "dd if=/dev/zero of=$HOME/io.bin bs=1M count=16 oflag=direct "
             "2>/dev/null && echo done"]
    limited = make_ws(workspaces_io_mbps=4)
    if cgroups.block_device_of(limited.root) is None:
        pytest.skip("the workspaces' files are not on a block device here")
    control = make_ws(workspaces_io_mbps=None)
    started = time.monotonic()
    out = control.run(write, timeout=120)
    unthrottled = time.monotonic() - started
    if out.stdout.strip() != "done":
        pytest.skip(f"direct I/O is not supported on this filesystem: {out.stderr}")
    started = time.monotonic()
    out = limited.run(write, timeout=120)
    throttled = time.monotonic() - started
    assert out.stdout.strip() == "done", out.stderr
    assert throttled >= 2.5 and throttled > 2 * unthrottled, (throttled, unthrottled)
