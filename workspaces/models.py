"""Control-plane tables of the enclave: workspaces and their GPU allocations.

``workspaces`` has one row per (person, permit) workspace, carrying the spawner's state
(see :mod:`workspaces.spawner` for the state machine). ``workspace_gpus`` has one row per
allocation of a physical GPU index; an allocation is *active* while ``released_at`` is NULL. A
partial unique index on (gpu_index, slot) over active rows makes the database itself refuse
double allocation: ``slot`` ranges over ``0 .. gpu_share_limit-1``, so with the default limit of
1 no two active rows can name the same GPU, whatever the interleaving of allocators.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from spe.db.base import Base, UTCDateTime, utcnow

BIG = BigInteger().with_variant(Integer, "sqlite")


class WorkspaceRow(Base):
    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    person: Mapped[str] = mapped_column(String(255), index=True)
    permit_id: Mapped[str] = mapped_column(String(64), index=True)
    unix_user: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delete_after: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)


class GpuAllocation(Base):
    __tablename__ = "workspace_gpus"
    __table_args__ = (
        Index("uq_workspace_gpus_active", "gpu_index", "slot", unique=True,
              sqlite_where=text("released_at IS NULL"),
              postgresql_where=text("released_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BIG, primary_key=True, autoincrement=True)
    gpu_index: Mapped[int] = mapped_column(Integer)
    slot: Mapped[int] = mapped_column(Integer)
    workspace_id: Mapped[str] = mapped_column(String(32), index=True)
    permit_id: Mapped[str] = mapped_column(String(64), index=True)
    person: Mapped[str] = mapped_column(String(255))
    allocated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
