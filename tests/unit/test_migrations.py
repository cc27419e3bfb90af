"""The migration chain has one head, and the migrated schema matches the models."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

import spe.models  # noqa: F401 - registers every table
from spe.db import Database
from spe.db.base import Base
from spe.db.migrate import alembic_config


def test_single_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script.get_heads() == ["0011_audit_archive_mark"]


def test_migrated_schema_matches_models(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.upgrade()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    # Only table/column presence matters here (types and indexes vary by backend).
    missing = [d for d in diff if d[0] in ("add_table", "remove_table", "add_column",
                                           "remove_column")]
    assert missing == []
    db.dispose()
