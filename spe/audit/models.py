"""Audit tables: the entries and a single head row that serialises appends.

``salt`` and ``permit_seq`` are NULL only on entries written before per-permit proofs existed
(their hashes then cover neither, see ``spe.audit.canonical``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from spe.audit.canonical import GENESIS_HASH
from spe.db.base import Base, UTCDateTime

__all__ = ["GENESIS_HASH", "AuditEntry", "AuditHead"]


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_permit_seq", "permit_id", "permit_seq", unique=True),
    )

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                     primary_key=True, autoincrement=False)
    time: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(255), index=True)
    role: Mapped[str | None] = mapped_column(String(64))
    permit_id: Mapped[str | None] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64), unique=True)
    salt: Mapped[str | None] = mapped_column(String(32))
    permit_seq: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))


class AuditHead(Base):
    """Exactly one row (id=1): the last sequence number and hash. Locked by every append."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    last_hash: Mapped[str] = mapped_column(String(64))
    #: The last entry held by a retention archive (0: none); the database refuses to delete
    #: entries above it (migration 0011).
    archived_seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                              server_default="0", default=0)
