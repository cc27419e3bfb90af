"""Airlock tables: export requests, their files, reviewers' votes and the release ledger.

A file's bytes live in the quarantine directory (``spe.airlock.storage``); its row holds the
SHA-256 and size recorded at upload and never changes them. ``export_releases`` is the
per-permit ledger of released files that differencing and hash recognition read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from spe.db.base import Base, UTCDateTime, utcnow

BIG = BigInteger().with_variant(Integer, "sqlite")


class ExportRequest(Base):
    __tablename__ = "export_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    permit_id: Mapped[str] = mapped_column(String(64), index=True)
    requester: Mapped[str] = mapped_column(String(255), index=True)
    justification: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32), index=True)
    round: Mapped[int] = mapped_column(Integer, default=0)
    reviewers_required: Mapped[int] = mapped_column(Integer, default=2)
    receipts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ExportFile(Base):
    __tablename__ = "export_files"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BIG)
    kind: Mapped[str | None] = mapped_column(String(32))
    outcome: Mapped[str | None] = mapped_column(String(16))
    checks: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ExportVote(Base):
    __tablename__ = "export_votes"
    __table_args__ = (UniqueConstraint("request_id", "round", "reviewer",
                                       name="uq_export_votes_reviewer"),)

    id: Mapped[int] = mapped_column(BIG, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(32), index=True)
    round: Mapped[int] = mapped_column(Integer)
    reviewer: Mapped[str] = mapped_column(String(255))
    decision: Mapped[str] = mapped_column(String(32))
    comment: Mapped[str | None] = mapped_column(Text)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    override_reason: Mapped[str | None] = mapped_column(Text)
    #: {file id: decision} when the reviewer decided files differently (None: ``decision``
    #: for every file).
    files: Mapped[dict[str, str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ExportRelease(Base):
    __tablename__ = "export_releases"

    id: Mapped[int] = mapped_column(BIG, primary_key=True, autoincrement=True)
    permit_id: Mapped[str] = mapped_column(String(64), index=True)
    request_id: Mapped[str] = mapped_column(String(32))
    file_id: Mapped[str] = mapped_column(String(32), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str | None] = mapped_column(String(32))
    released_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
