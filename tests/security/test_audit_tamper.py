"""An attacker with raw access to the control database (SQLite and PostgreSQL) edits the audit
log directly: every change is caught, and the report names the first bad entry. Whoever also
rewrites every later hash and the head row defeats the chain alone, but not a signed checkpoint
an access body already holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from spe.audit import AuditEvent, record, verify_chain
from spe.audit.canonical import GENESIS_HASH, compute_entry_hash
from spe.audit.checkpoints import CheckpointLog, KeyStore, LogTampered
from spe.audit.models import AuditEntry
from spe.audit.proofs import check_against_checkpoints, create_checkpoint
from spe.audit.writer import entry_fields
from spe.db import Database

N = 8


def _fill(db: Database, n: int = N, start: int = 0) -> None:
    for i in range(start, start + n):
        with db.write() as s:
            record(s, AuditEvent(action="audit.test", actor=f"user{i % 3}", role="researcher",
                                 permit_id=f"p{i % 2}", target=str(i), details={"i": i}))


def _raw(db: Database, *statements: str) -> None:
    """Run SQL as the attacker: the append-only triggers dropped first."""
    with db.engine.begin() as conn:
        if db.is_sqlite:
            conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_update"))
            conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_delete"))
        else:
            conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only"))
        for stmt in statements:
            conn.execute(text(stmt))


def _verify(db: Database) -> tuple[bool, int | None, str | None]:
    with db.read() as s:
        report = verify_chain(s)
    return report.ok, report.first_bad_seq, report.problem


@pytest.fixture
def filled(db: Database) -> Database:
    _fill(db)
    assert _verify(db) == (True, None, None)
    return db


@pytest.mark.parametrize("column, value", [
    ("actor", "'mallory'"), ("outcome", "'refused'"), ("details", "'{\"i\": 99}'"),
    ("salt", "'00000000000000000000000000000000'"), ("permit_seq", "7"),
    ("time", "'2020-01-01 00:00:00'"), ("permit_id", "NULL"),
])
def test_changed_bytes_of_one_entry(filled: Database, column: str, value: str) -> None:
    _raw(filled, f"UPDATE audit_log SET {column} = {value} WHERE seq = 4")
    ok, first_bad, problem = _verify(filled)
    assert not ok and first_bad == 4, problem


def test_changed_stored_hash(filled: Database) -> None:
    _raw(filled, "UPDATE audit_log SET entry_hash = '" + "a" * 64 + "' WHERE seq = 5")
    ok, first_bad, _ = _verify(filled)
    assert not ok and first_bad == 5


def test_deleted_entry_in_the_middle(filled: Database) -> None:
    _raw(filled, "DELETE FROM audit_log WHERE seq = 3")
    ok, first_bad, problem = _verify(filled)
    assert not ok and first_bad == 3 and problem == "entry missing from the sequence"


def test_deleted_last_entries(filled: Database) -> None:
    _raw(filled, f"DELETE FROM audit_log WHERE seq > {N - 2}")
    ok, first_bad, problem = _verify(filled)
    assert not ok and first_bad == N - 1
    assert problem == "entries removed from the end of the chain"


def test_deleted_first_entry(filled: Database) -> None:
    _raw(filled, "DELETE FROM audit_log WHERE seq = 1")
    ok, first_bad, _ = _verify(filled)
    assert not ok and first_bad == 1


def _rewrite_from(db: Database, seq: int, *, truncate_to: int | None = None) -> None:
    """The strongest attacker: change entry ``seq``, recompute every later hash and the head
    row (optionally dropping the entries after ``truncate_to``), so the chain verifies."""
    with db.read() as s:
        entries = s.query(AuditEntry).order_by(AuditEntry.seq).all()
    keep = entries[:truncate_to] if truncate_to is not None else entries
    prev = GENESIS_HASH
    statements = []
    if truncate_to is not None:
        statements.append(f"DELETE FROM audit_log WHERE seq > {truncate_to}")
    for entry in keep:
        fields = entry_fields(entry)
        if entry.seq == seq:
            fields["actor"] = "mallory"
        if entry.seq >= seq:
            digest = compute_entry_hash(entry.seq, prev, fields)
            statements.append(f"UPDATE audit_log SET actor = '{fields['actor']}', "
                              f"prev_hash = '{prev}', entry_hash = '{digest}' "
                              f"WHERE seq = {entry.seq}")
            prev = digest
        else:
            prev = entry.entry_hash
    statements.append(f"UPDATE audit_head SET seq = {len(keep)}, last_hash = '{prev}'")
    # Entry hashes are unique: clear the old ones first so the rewrite can be applied.
    _raw(db, *[f"UPDATE audit_log SET entry_hash = 'tmp{e.seq}' WHERE seq = {e.seq}"
               for e in keep if e.seq >= seq], *statements)


def test_checkpoint_exposes_a_rewrite_of_the_whole_chain(filled: Database,
                                                         tmp_path: Path) -> None:
    keys, log = KeyStore(tmp_path), CheckpointLog(tmp_path)
    with filled.read() as s:
        early = create_checkpoint(s, keys, log, "test")
    _fill(filled, 4, start=N)
    with filled.read() as s:
        late = create_checkpoint(s, keys, log, "test")
    assert (early.size, late.size) == (N, N + 4)
    _rewrite_from(filled, 3)
    assert _verify(filled) == (True, None, None)  # the chain alone is fooled
    with filled.read() as s:
        check = check_against_checkpoints(s, log.all())
        assert not check.ok and check.first_bad_seq == 1 and "rewritten" in (check.problem or "")
        with pytest.raises(LogTampered):
            create_checkpoint(s, keys, log, "test")  # the SPE refuses to sign over it
    assert len(log.all()) == 2


def test_checkpoint_exposes_a_rewrite_after_it(filled: Database, tmp_path: Path) -> None:
    keys, log = KeyStore(tmp_path), CheckpointLog(tmp_path)
    with filled.read() as s:
        create_checkpoint(s, keys, log, "test")
    _fill(filled, 4, start=N)
    with filled.read() as s:
        create_checkpoint(s, keys, log, "test")
    _rewrite_from(filled, N + 2)
    assert _verify(filled) == (True, None, None)
    with filled.read() as s:
        check = check_against_checkpoints(s, log.all())
    assert not check.ok and check.first_bad_seq == N + 1  # after the first checkpoint


def test_checkpoint_exposes_truncation_with_a_rewritten_head(filled: Database,
                                                             tmp_path: Path) -> None:
    keys, log = KeyStore(tmp_path), CheckpointLog(tmp_path)
    with filled.read() as s:
        create_checkpoint(s, keys, log, "test")
    with filled.read() as s:
        last = s.query(AuditEntry).filter(AuditEntry.seq == N - 3).one()
    _raw(filled, f"DELETE FROM audit_log WHERE seq > {N - 3}",
         f"UPDATE audit_head SET seq = {N - 3}, last_hash = '{last.entry_hash}'")
    assert _verify(filled) == (True, None, None)
    with filled.read() as s:
        check = check_against_checkpoints(s, log.all())
        assert not check.ok and check.first_bad_seq == N - 2
        with pytest.raises(LogTampered):
            create_checkpoint(s, keys, log, "test")
