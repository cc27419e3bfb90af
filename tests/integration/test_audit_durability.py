"""The act and its audit entry survive a power loss once committed: SQLite with full
synchronous commits, PostgreSQL with its durable defaults."""

from __future__ import annotations

from sqlalchemy import text

from spe.db import Database


def test_commits_are_durable(db: Database) -> None:
    with db.engine.connect() as conn:
        if db.is_sqlite:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        else:
            assert conn.execute(text("SHOW fsync")).scalar() == "on"
            assert conn.execute(text("SHOW synchronous_commit")).scalar() in ("on", "remote_apply",
                                                                              "remote_write")
            assert conn.execute(text("SHOW full_page_writes")).scalar() == "on"
