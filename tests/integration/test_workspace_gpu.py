"""GPU allocator against the real control DB (SQLite and PostgreSQL).

No GPUs on the test machines: the inventory is configured (``gpu_indices``), which is exactly
what the allocator records and audits; device-node binding is covered by ``device_nodes``
returning nothing when no /dev/nvidiaN exists.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.db import Database
from workspaces import gpu
from workspaces.errors import GpuUnavailable
from workspaces.settings import WorkspaceSettings

ONE_GPU = WorkspaceSettings(gpu_indices=(0,))


def _alloc(db: Database, ws: str, settings: WorkspaceSettings = ONE_GPU, count: int = 1,
           wait: float = 0.0) -> tuple[int, ...]:
    return gpu.allocate(db, workspace_id=ws, permit_id=f"P-{ws}", person="alice", count=count,
                        settings=settings, actor="alice", wait_seconds=wait, poll_seconds=0.1)


def test_one_gpu_is_held_by_one_workspace_at_a_time(db: Database) -> None:
    assert _alloc(db, "wsA") == (0,)
    assert _alloc(db, "wsA") == (0,)  # idempotent
    with pytest.raises(GpuUnavailable):
        _alloc(db, "wsB")
    assert gpu.release(db, "wsA", actor="system") == (0,)
    assert gpu.release(db, "wsA") == ()
    assert _alloc(db, "wsB") == (0,)
    assert gpu.held(db, "wsB") == (0,) and gpu.held(db, "wsA") == ()
    with db.read() as s:
        rows = s.execute(select(AuditEntry.action, AuditEntry.outcome, AuditEntry.target)
                         .where(AuditEntry.action.like("workspace.gpu_%"))
                         .order_by(AuditEntry.seq)).all()
    assert [tuple(r) for r in rows] == [
        ("workspace.gpu_allocate", "success", "wsA"),
        ("workspace.gpu_allocate", "refused", "wsB"),
        ("workspace.gpu_release", "success", "wsA"),
        ("workspace.gpu_allocate", "success", "wsB"),
    ]


def test_waiting_workspace_gets_the_gpu_when_released(db: Database) -> None:
    _alloc(db, "wsA")
    timer = threading.Timer(0.5, gpu.release, args=(db, "wsA"))
    timer.start()
    start = time.monotonic()
    assert _alloc(db, "wsB", wait=10) == (0,)
    assert time.monotonic() - start >= 0.4
    timer.join()


def test_concurrent_allocators_never_share(db: Database) -> None:
    def attempt(i: int) -> tuple[int, ...] | None:
        try:
            return _alloc(db, f"ws{i}")
        except GpuUnavailable:
            return None

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(attempt, range(6)))
    assert sum(r is not None for r in results) == 1


def test_operator_may_allow_sharing_and_multi_gpu(db: Database) -> None:
    shared = WorkspaceSettings(gpu_indices=(0, 1), gpu_share_limit=2)
    assert _alloc(db, "wsA", shared, count=2) == (0, 1)
    assert _alloc(db, "wsB", shared, count=1) in {(0,), (1,)}
    assert _alloc(db, "wsC", shared, count=1) in {(0,), (1,)}
    with pytest.raises(GpuUnavailable):
        _alloc(db, "wsD", shared, count=1)


def test_inventory_and_device_nodes(tmp_path: Path) -> None:
    assert gpu.inventory(WorkspaceSettings(gpu_indices=(2, 0)), dev=tmp_path) == (0, 2)
    (tmp_path / "nvidia1").touch()
    (tmp_path / "nvidiactl").touch()
    assert gpu.inventory(WorkspaceSettings(), dev=tmp_path) == (1,)
    assert gpu.device_nodes((1,), dev=tmp_path) == (str(tmp_path / "nvidia1"),
                                                    str(tmp_path / "nvidiactl"))
    assert gpu.device_nodes((), dev=tmp_path) == ()
