"""The verifier's raw-row canonical bytes (spe.audit.fast_verify) equal the reference encoder's
(spe.audit.canonical) for entries of every shape, on SQLite and PostgreSQL, and a changed
byte in any column is still caught."""

from __future__ import annotations

from datetime import UTC, datetime

from spe.audit import AuditEvent, record, verify_chain
from spe.audit.canonical import canonical
from spe.audit.fast_verify import raw_rows
from spe.audit.writer import iter_rows, row_fields
from spe.db import Database
from tests.security.test_audit_tamper import _raw

EVENTS = [
    AuditEvent(action="dp.query", actor="alice"),
    AuditEvent(action="dp.query", actor="Ünïcødé ✓ \"q\" \\ \n", role="researcher",
               permit_id="P-1", target="t/1", reason="why\tnot", outcome="refused",
               details={"b": [1, 2.5, None, True], "a": {"z": "é", "y": 1e-7},
                        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "n": -3}),
    AuditEvent(action="permit.issue", actor="x", permit_id="P-1",
               time=datetime(2026, 1, 1, tzinfo=UTC), details={}),
]


def test_raw_canonical_bytes_match_the_reference(db: Database) -> None:
    for event in EVENTS * 3:
        with db.write() as s:
            record(s, event)
    with db.read() as s:
        raw = list(raw_rows(s, 10**9))
        ref = list(iter_rows(s))
        assert len(raw) == len(ref) == 9
        for (seq, _p, _ps, prev, _digest, body), row in zip(raw, ref, strict=True):
            assert body == canonical(seq, prev, row_fields(row))
        assert verify_chain(s).ok
    # one character of the reason changed directly in the table (as an attacker: the
    # append-only triggers dropped first)
    _raw(db, "UPDATE audit_log SET reason = 'why not' WHERE seq = 5")
    with db.read() as s:
        report = verify_chain(s)
    assert not report.ok and report.first_bad_seq == 5
