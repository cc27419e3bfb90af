"""The audit write path on both databases: chained, atomic with the act, append-only."""

from __future__ import annotations

import itertools
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from spe.audit import AuditEvent, Outcome, record, verify_chain
from spe.audit.models import AuditEntry
from spe.db import Database


def _event(i: int) -> AuditEvent:
    return AuditEvent(action="audit.test", actor=f"user{i}", role="operator", target=str(i),
                      details={"i": i})


def test_chain_links_and_verifies(db: Database) -> None:
    for i in range(5):
        with db.write() as s:
            record(s, _event(i))
    with db.read() as s:
        report = verify_chain(s)
        entries = s.query(AuditEntry).order_by(AuditEntry.seq).all()
    assert report.ok and report.entries == 5
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    for prev, cur in itertools.pairwise(entries):
        assert cur.prev_hash == prev.entry_hash


def test_audit_rolls_back_with_the_act(db: Database) -> None:
    with pytest.raises(RuntimeError), db.write() as s:
        record(s, _event(1))
        raise RuntimeError("the act failed")
    with db.read() as s:
        assert verify_chain(s).entries == 0


def test_append_only_enforced_by_database(db: Database) -> None:
    with db.write() as s:
        record(s, _event(1))
    for stmt in ("UPDATE audit_log SET actor='mallory'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError), db.write() as s:
            s.execute(text(stmt))
    with db.read() as s:
        assert verify_chain(s).ok


def test_tampering_detected(db: Database) -> None:
    for i in range(3):
        with db.write() as s:
            record(s, _event(i))
    # An attacker with raw database access drops the guard and edits an entry.
    with db.write() as s:
        if db.is_sqlite:
            s.execute(text("DROP TRIGGER audit_log_no_update"))
        else:
            s.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only"))
        s.execute(text("UPDATE audit_log SET outcome='refused' WHERE seq=2"))
    with db.read() as s:
        report = verify_chain(s)
    assert not report.ok and report.first_bad_seq == 2


def test_concurrent_appends_never_fork(db: Database) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                with db.write() as s:
                    record(s, AuditEvent(action="audit.test", actor=f"w{n}",
                                         outcome=Outcome.SUCCESS, details={"i": i}))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with db.read() as s:
        report = verify_chain(s)
    assert report.ok and report.entries == 40


def test_event_validation() -> None:
    with pytest.raises(ValueError):
        AuditEvent(action="no-dots", actor="x")
