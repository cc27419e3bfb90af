"""The archived mark (migration 0011) on SQLite and PostgreSQL: the database refuses to delete
entries above it (and to change any entry, or truncate the log on PostgreSQL), lets only
entries at or below it be deleted, and the mark only grows up to the head."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from spe.audit import AuditEvent, record
from spe.db import Database


def _refused(db: Database, sql: str) -> None:
    with pytest.raises(DBAPIError, match=r"append-only|only grows"), db.write() as s:
        s.execute(text(sql))


def test_deletes_only_below_the_archived_mark(db: Database) -> None:
    for i in range(5):
        with db.write() as s:
            record(s, AuditEvent(action="dp.query", actor=f"u{i}"))
    _refused(db, "DELETE FROM audit_log WHERE seq = 1")  # mark 0: nothing deletable
    with db.write() as s:
        s.execute(text("UPDATE audit_head SET archived_seq = 2 WHERE id = 1"))
    _refused(db, "DELETE FROM audit_log WHERE seq = 3")  # a live row above the mark
    _refused(db, "UPDATE audit_log SET actor = 'x' WHERE seq = 1")  # changes stay refused
    _refused(db, "UPDATE audit_head SET archived_seq = 1 WHERE id = 1")  # never shrinks
    _refused(db, "UPDATE audit_head SET archived_seq = 6 WHERE id = 1")  # never past head
    if not db.is_sqlite:
        _refused(db, "TRUNCATE audit_log")
    with db.write() as s:
        s.execute(text("DELETE FROM audit_log WHERE seq <= 2"))
    with db.read() as s:
        assert s.execute(text("SELECT min(seq), count(*) FROM audit_log")).one() == (3, 3)
