"""GPU allocator: physical GPU indices per workspace, recorded in the control DB and audited.

Contract:

* :func:`allocate` gives workspace ``ws`` exactly ``count`` GPU indices from the inventory or
  raises :class:`~workspaces.errors.GpuUnavailable` (audited as refused). It is idempotent: a
  workspace that already holds GPUs gets the same indices back. No index is held by more than
  ``share_limit`` workspaces at once (default 1: no sharing); the database enforces this with a
  partial unique index on (gpu_index, slot) over active allocations, so concurrent allocators
  cannot both win. With ``wait_seconds`` it retries until a GPU frees up (first come, first
  served by polling), giving "one at a time" semantics to workspaces sharing one GPU.
* :func:`release` ends every active allocation of a workspace (audited); idempotent.
* :func:`device_nodes` names the device files the sandbox binds for the indices (only those
  that exist: on machines without GPUs there are none and Ray's logical GPUs stand in).
* The inventory is ``WorkspaceSettings.gpu_indices`` or, when empty, the ``/dev/nvidiaN``
  nodes present.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from spe.audit import AuditEvent, Outcome, record
from spe.db import Database
from spe.db.base import utcnow
from workspaces.errors import GpuUnavailable
from workspaces.models import GpuAllocation
from workspaces.settings import WorkspaceSettings

_NVIDIA = re.compile(r"^nvidia(\d+)$")


def inventory(settings: WorkspaceSettings, dev: Path = Path("/dev")) -> tuple[int, ...]:
    """The GPU indices the allocator hands out."""
    if settings.gpu_indices:
        return tuple(sorted(set(settings.gpu_indices)))
    found = []
    if dev.is_dir():
        for entry in dev.iterdir():
            match = _NVIDIA.match(entry.name)
            if match:
                found.append(int(match.group(1)))
    return tuple(sorted(found))


def device_nodes(indices: tuple[int, ...], dev: Path = Path("/dev")) -> tuple[str, ...]:
    """Device files a workspace holding ``indices`` needs (existing ones only)."""
    if not indices:
        return ()
    names = [f"nvidia{i}" for i in indices] + ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]
    return tuple(str(dev / n) for n in names if (dev / n).exists())


def held(db: Database, workspace_id: str) -> tuple[int, ...]:
    with db.read() as session:
        rows = session.execute(
            select(GpuAllocation.gpu_index).where(
                GpuAllocation.workspace_id == workspace_id, GpuAllocation.released_at.is_(None)
            ).order_by(GpuAllocation.gpu_index)).scalars()
        return tuple(rows)


def _try_allocate(db: Database, *, workspace_id: str, permit_id: str, person: str,
                  count: int, indices: tuple[int, ...], share_limit: int,
                  actor: str) -> tuple[int, ...] | None:
    with db.write() as session:
        mine = session.execute(
            select(GpuAllocation.gpu_index).where(
                GpuAllocation.workspace_id == workspace_id, GpuAllocation.released_at.is_(None)
            )).scalars().all()
        if mine:
            return tuple(sorted(mine))
        # One snapshot of the active slots (two queries could see different commits under
        # READ COMMITTED and offer a GPU with no free slot).
        taken_slots: dict[int, set[int]] = {}
        for gpu, slot in session.execute(
                select(GpuAllocation.gpu_index, GpuAllocation.slot).where(
                    GpuAllocation.released_at.is_(None))).all():
            taken_slots.setdefault(gpu, set()).add(slot)
        load = {gpu: len(slots) for gpu, slots in taken_slots.items()}
        free = sorted((i for i in indices if load.get(i, 0) < share_limit),
                      key=lambda i: (load.get(i, 0), i))
        if len(free) < count:
            return None
        chosen = tuple(sorted(free[:count]))
        for gpu in chosen:
            slot = min(set(range(share_limit)) - taken_slots.get(gpu, set()))
            session.add(GpuAllocation(gpu_index=gpu, slot=slot, workspace_id=workspace_id,
                                      permit_id=permit_id, person=person))
        session.flush()
        record(session, AuditEvent(action="workspace.gpu_allocate", actor=actor,
                                   role="researcher", permit_id=permit_id,
                                   target=workspace_id,
                                   details={"gpus": list(chosen), "person": person}))
        return chosen


def allocate(db: Database, *, workspace_id: str, permit_id: str, person: str, count: int,
             settings: WorkspaceSettings, actor: str = "system",
             wait_seconds: float = 0.0, poll_seconds: float = 0.5) -> tuple[int, ...]:
    """Allocate ``count`` GPUs to the workspace (see the module contract)."""
    if count <= 0:
        return ()
    indices = inventory(settings)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            got = _try_allocate(db, workspace_id=workspace_id, permit_id=permit_id,
                                person=person, count=count, indices=indices,
                                share_limit=settings.gpu_share_limit, actor=actor)
        except IntegrityError:  # a concurrent allocator took the slot first
            got = None
        if got is not None:
            return got
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_seconds)
    reason = f"{count} GPU(s) requested, not enough free among {len(indices)}"
    with db.write() as session:
        record(session, AuditEvent(action="workspace.gpu_allocate", actor=actor,
                                   role="researcher", permit_id=permit_id,
                                   target=workspace_id, outcome=Outcome.REFUSED,
                                   reason=reason, details={"requested": count}))
    raise GpuUnavailable(reason + "; try again when another workspace stops")


def release(db: Database, workspace_id: str, *, actor: str = "system") -> tuple[int, ...]:
    """Release every GPU the workspace holds; returns the indices released."""
    with db.write() as session:
        rows = session.execute(
            select(GpuAllocation).where(GpuAllocation.workspace_id == workspace_id,
                                        GpuAllocation.released_at.is_(None))).scalars().all()
        if not rows:
            return ()
        released = tuple(sorted(r.gpu_index for r in rows))
        session.execute(
            update(GpuAllocation).where(GpuAllocation.workspace_id == workspace_id,
                                        GpuAllocation.released_at.is_(None))
            .values(released_at=utcnow()))
        record(session, AuditEvent(action="workspace.gpu_release", actor=actor,
                                   permit_id=rows[0].permit_id, target=workspace_id,
                                   details={"gpus": list(released)}))
        return released
