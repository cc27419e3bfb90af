"""The dataset registry: list, show, remove, and ``open_dataset`` for the DP engine.

Contract:

* ``list_datasets(db)`` / ``get_dataset(db, name)`` return ``DatasetInfo`` (metadata only,
  never data values); an unknown name raises ``NotFound``.
* ``open_dataset(db, settings, name)`` returns ``(DatasetMetadata, path of the DuckDB file)``.
  Callers open the file read-only; the file is never handed to a workspace.
* ``remove_dataset`` deletes the registry row and the DuckDB file and records a
  ``dataset.remove`` audit event in the same transaction; on any failure neither goes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from spe.audit import AuditEvent, Outcome, record
from spe.auth.principal import Principal
from spe.config import Settings
from spe.datasets.metadata import DatasetMetadata
from spe.datasets.models import DatasetRecord
from spe.db import Database
from spe.errors import NotFound, ServiceUnavailable, SPEError


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset as the registry shows it."""

    name: str
    store_file: str
    created_at: datetime
    created_by: str
    total_rows: int
    metadata: DatasetMetadata


def _info(rec: DatasetRecord) -> DatasetInfo:
    return DatasetInfo(name=rec.name, store_file=rec.store_file, created_at=rec.created_at,
                       created_by=rec.created_by, total_rows=int(rec.total_rows),
                       metadata=DatasetMetadata.model_validate(rec.meta))


def list_datasets(db: Database) -> list[DatasetInfo]:
    """Every registered dataset, by name."""
    with db.read() as session:
        rows = session.execute(select(DatasetRecord).order_by(DatasetRecord.name)).scalars()
        return [_info(r) for r in rows]


def get_dataset(db: Database, name: str) -> DatasetInfo:
    """One dataset; ``NotFound`` if no dataset has this name."""
    with db.read() as session:
        rec = session.execute(
            select(DatasetRecord).where(DatasetRecord.name == name)).scalar_one_or_none()
        if rec is None:
            raise NotFound(f"no dataset named {name!r}")
        return _info(rec)


def dataset_path(settings: Settings, info: DatasetInfo) -> Path:
    return settings.store_dir / info.store_file


def open_dataset(db: Database, settings: Settings, name: str) -> tuple[DatasetMetadata, Path]:
    """Metadata and DuckDB file of ``name`` for the DP engine (open it read-only)."""
    info = get_dataset(db, name)
    path = dataset_path(settings, info)
    if not path.is_file():
        raise ServiceUnavailable(f"the store file of dataset {name!r} is missing; "
                                 "ask the operator to re-ingest it")
    return info.metadata, path


def remove_dataset(db: Database, settings: Settings, name: str, principal: Principal) -> None:
    """Delete dataset ``name`` (file and row) with a ``dataset.remove`` audit event.

    A refused or failed removal is audited too (outcome ``failure``, own transaction).
    """
    try:
        _remove(db, settings, name, principal)
    except Exception as exc:
        reason = exc.detail if isinstance(exc, SPEError) else (
            f"internal error ({type(exc).__name__})")
        with db.write() as session:
            record(session, AuditEvent(
                action="dataset.remove", actor=principal.actor, role=principal.primary_role(),
                target=name, outcome=Outcome.FAILURE, reason=reason))
        raise


def _remove(db: Database, settings: Settings, name: str, principal: Principal) -> None:
    path: Path | None = None
    tomb: Path | None = None
    committed = False
    try:
        with db.write() as session:
            rec = session.execute(
                select(DatasetRecord).where(DatasetRecord.name == name)
                .with_for_update()).scalar_one_or_none()
            if rec is None:
                raise NotFound(f"no dataset named {name!r}")
            path = settings.store_dir / rec.store_file
            details = {"rows": int(rec.total_rows), "store_file": rec.store_file,
                       "content_sha256": (rec.meta or {}).get("content_sha256")}
            session.delete(rec)
            record(session, AuditEvent(
                action="dataset.remove", actor=principal.actor, role=principal.primary_role(),
                target=name, details=details))
            session.flush()
            if path.exists():
                # Move aside first: restored if the transaction fails, deleted once it commits.
                tomb = path.with_name(f".{path.name}.removing")
                os.replace(path, tomb)
        committed = True
    finally:
        if tomb is not None and path is not None:
            if committed:
                tomb.unlink(missing_ok=True)
                for extra in (path.with_name(path.name + ".wal"),):
                    with contextlib.suppress(FileNotFoundError):
                        extra.unlink()
            else:
                os.replace(tomb, path)
