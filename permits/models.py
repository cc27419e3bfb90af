"""Control-plane tables of the permits package.

* ``permits``: one row per permit, the current state only (recorded status, current version,
  ETag, validity window for the expiry sweeper). Updated in place under a row lock, but its
  content lives in ``permit_versions``, which are only ever inserted: nothing is overwritten.
* ``permit_versions``: the full snapshot (JSON) of every version, who made it, when, what kind
  of change, which fields changed.
* ``permit_persons`` / ``permit_datasets``: index of the *current* version's persons and
  datasets, for the list filters (rewritten with each version).
* ``permit_events``: the outbox of the permit event stream (monotonic id).
* ``permit_idempotency``: Idempotency-Key records of issue requests, per access body.

No foreign keys to other packages' tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from spe.db.base import Base, UTCDateTime

BIG = BigInteger().with_variant(Integer, "sqlite")


class Permit(Base):
    __tablename__ = "permits"
    __table_args__ = (
        UniqueConstraint("access_body", "reference", name="uq_permits_access_body_reference"),
    )

    seq: Mapped[int] = mapped_column(BIG, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    access_body: Mapped[str] = mapped_column(String(255), index=True)
    reference: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), index=True)
    version: Mapped[int] = mapped_column(Integer)
    etag: Mapped[str] = mapped_column(String(80))
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime())
    valid_until: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    extended: Mapped[bool] = mapped_column(Boolean, default=False)
    group_state: Mapped[str] = mapped_column(String(16), default="present")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PermitVersion(Base):
    __tablename__ = "permit_versions"

    permit_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("permits.id", ondelete="RESTRICT"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    change: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)
    changed_fields: Mapped[list[str]] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text)
    time: Mapped[datetime] = mapped_column(UTCDateTime())


class PermitPerson(Base):
    __tablename__ = "permit_persons"

    permit_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("permits.id", ondelete="CASCADE"), primary_key=True
    )
    username: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)


class PermitDataset(Base):
    __tablename__ = "permit_datasets"

    permit_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("permits.id", ondelete="CASCADE"), primary_key=True
    )
    dataset: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class PermitEvent(Base):
    """An outbox row. ``id`` comes from ``PermitEventHead`` (locked until commit), so ids are
    gapless and become visible in order: a poller reading ``id > after`` never skips one."""

    __tablename__ = "permit_events"
    __table_args__ = (Index("ix_permit_events_permit_id", "permit_id"),)

    id: Mapped[int] = mapped_column(BIG, primary_key=True, autoincrement=False)
    permit_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    time: Mapped[datetime] = mapped_column(UTCDateTime())


class PermitEventHead(Base):
    """Exactly one row (id=1): the last event id handed out."""

    __tablename__ = "permit_event_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_id: Mapped[int] = mapped_column(BIG)


class IdempotencyRecord(Base):
    __tablename__ = "permit_idempotency"

    access_body: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    permit_id: Mapped[str] = mapped_column(String(36))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
