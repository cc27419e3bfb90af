"""HTTP routes of this package: what runs in the enclave, for the people who operate it.

* ``GET /v1/workspaces``: every workspace (one per person and permit) with its permit, person,
  state, start/stop times, retention deadline and the GPU indices it holds now.
* ``GET /v1/gpus``: the GPU inventory the allocator hands out, the share limit, and the
  allocations (active ones by default; ``include_released=true`` adds the history).

Readable by operators and hospital admins only (``require_role``); researchers and access
bodies get 403. Nothing secret is shown: no tokens, no paths, no Unix ids.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from spe.api.routing import AuditedRoute
from spe.api.state import get_db
from spe.auth.deps import require_role
from spe.auth.principal import Principal, Role
from spe.db import Database
from workspaces import gpu
from workspaces.lifecycle import server_name
from workspaces.models import GpuAllocation, WorkspaceRow
from workspaces.settings import get_workspace_settings

router = APIRouter(tags=["workspaces"], route_class=AuditedRoute)
_operators = require_role(Role.OPERATOR, Role.HOSPITAL_ADMIN)


class WorkspacePublic(BaseModel):
    id: str = Field(description="workspace id (stable per person and permit)")
    permit_id: str
    person: str
    server_name: str = Field(description="the hub's named server of this workspace")
    state: str = Field(description="starting, running, stopped, refused, failed or deleted")
    started_at: datetime | None
    stopped_at: datetime | None
    updated_at: datetime
    delete_after: datetime | None = Field(description="retention deadline of its data, if set")
    gpus: list[int] = Field(description="physical GPU indices held now (empty when none)")


class GpuAllocationPublic(BaseModel):
    gpu_index: int
    slot: int
    workspace_id: str
    permit_id: str
    person: str
    allocated_at: datetime
    released_at: datetime | None


class GpuReport(BaseModel):
    inventory: list[int] = Field(description="GPU indices the allocator hands out")
    share_limit: int = Field(description="workspaces that may hold one GPU at once")
    allocations: list[GpuAllocationPublic]


def _active_gpus(db: Database) -> dict[str, list[int]]:
    held: dict[str, list[int]] = defaultdict(list)
    with db.read() as session:
        for ws_id, index in session.execute(
                select(GpuAllocation.workspace_id, GpuAllocation.gpu_index)
                .where(GpuAllocation.released_at.is_(None))
                .order_by(GpuAllocation.gpu_index)):
            held[ws_id].append(int(index))
    return held


@router.get("/v1/workspaces", response_model=list[WorkspacePublic], name="workspace.list",
            operation_id="listWorkspaces", summary="List workspaces")
def list_workspaces(
    _caller: Annotated[Principal, Depends(_operators)],
    db: Annotated[Database, Depends(get_db)],
    state: Annotated[str | None, Query(max_length=16)] = None,
    permit_id: Annotated[str | None, Query(max_length=64)] = None,
) -> list[WorkspacePublic]:
    """Workspaces, most recently changed first (filter by ``state`` or ``permit_id``)."""
    held = _active_gpus(db)
    query = select(WorkspaceRow).order_by(WorkspaceRow.updated_at.desc(), WorkspaceRow.id)
    if state:
        query = query.where(WorkspaceRow.state == state)
    if permit_id:
        query = query.where(WorkspaceRow.permit_id == permit_id)
    with db.read() as session:
        return [WorkspacePublic(
            id=r.id, permit_id=r.permit_id, person=r.person,
            server_name=server_name(r.permit_id), state=r.state, started_at=r.started_at,
            stopped_at=r.stopped_at, updated_at=r.updated_at, delete_after=r.delete_after,
            gpus=held.get(r.id, [])) for r in session.execute(query).scalars()]


@router.get("/v1/gpus", response_model=GpuReport, name="workspace.gpus",
            operation_id="listGpus", summary="GPU inventory and allocations")
def list_gpus(
    _caller: Annotated[Principal, Depends(_operators)],
    db: Annotated[Database, Depends(get_db)],
    include_released: bool = False,
) -> GpuReport:
    """The GPU inventory and its allocations (active only unless ``include_released``)."""
    settings = get_workspace_settings()
    query = select(GpuAllocation).order_by(GpuAllocation.gpu_index, GpuAllocation.slot,
                                           GpuAllocation.id)
    if not include_released:
        query = query.where(GpuAllocation.released_at.is_(None))
    with db.read() as session:
        rows = [GpuAllocationPublic(
            gpu_index=r.gpu_index, slot=r.slot, workspace_id=r.workspace_id,
            permit_id=r.permit_id, person=r.person, allocated_at=r.allocated_at,
            released_at=r.released_at) for r in session.execute(query).scalars()]
    return GpuReport(inventory=list(gpu.inventory(settings)),
                     share_limit=settings.gpu_share_limit, allocations=rows)
