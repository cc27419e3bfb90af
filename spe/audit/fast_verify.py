"""The chain check over raw database rows: what ``spe.audit.writer.verify_chain`` runs.

Contract: :func:`raw_rows` streams ``(seq, permit_id, permit_seq, prev_hash, entry_hash,
canonical bytes)`` for entries ``1..upto`` straight from the DBAPI cursor (no ORM, no
SQLAlchemy result processing; a server-side cursor on PostgreSQL, so memory stays bounded).
The canonical bytes are built with a fixed key order from the stored columns and are
byte-for-byte what ``spe.audit.canonical.canonical`` gives for the same fields (a unit test
compares the two on entries of every shape); only ``details`` goes through ``json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _s  # type: ignore[attr-defined]
from typing import Any

from sqlalchemy.orm import Session

from spe.audit.canonical import canonical

_SQL = ("SELECT seq, time, actor, role, permit_id, action, target, outcome, reason, "
        "request_id, details, salt, permit_seq, prev_hash, entry_hash FROM audit_log "
        "WHERE seq <= {p} ORDER BY seq")

_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode


def _j(value: str | None) -> str:
    return "null" if value is None else _s(value)


def _time(value: Any) -> str:
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.isoformat(timespec="microseconds")
    # SQLite: "YYYY-MM-DD HH:MM:SS.ffffff" in UTC (as SQLAlchemy stores DateTime there)
    text = str(value)
    if "." not in text:
        text += ".000000"
    return text.replace(" ", "T", 1) + "+00:00"


def raw_rows(session: Session, upto: int, batch: int = 10_000
             ) -> Iterator[tuple[int, str | None, int | None, str, str, bytes]]:
    conn = session.connection()
    driver = conn.connection.driver_connection
    if conn.dialect.name == "sqlite":
        cursor = driver.execute(_SQL.format(p="?"), (upto,))  # type: ignore[union-attr]
        decode = True
    else:
        cursor = driver.cursor(name="spe_audit_verify")  # type: ignore[union-attr]
        cursor.itersize = batch
        cursor.execute(_SQL.format(p="%s"), (upto,))
        decode = False
    loads = json.loads
    for (seq, time, actor, role, permit_id, action, target, outcome, reason, request_id,
         details, salt, permit_seq, prev_hash, digest) in cursor:
        if decode and isinstance(details, str):
            details = loads(details)
        if salt is None:  # entries from before per-permit proofs: the general encoder
            fields = {"time": _time(time), "actor": actor, "role": role,
                      "permit_id": permit_id, "action": action, "target": target,
                      "outcome": outcome, "reason": reason, "request_id": request_id,
                      "details": details}
            body = canonical(seq, prev_hash, fields)
        else:
            body = (
                f'{{"action":{_j(action)},"actor":{_j(actor)},"details":{_dumps(details)},'
                f'"outcome":{_j(outcome)},"permit_id":{_j(permit_id)},'
                f'"permit_seq":{"null" if permit_seq is None else int(permit_seq)},'
                f'"prev_hash":{_j(prev_hash)},"reason":{_j(reason)},'
                f'"request_id":{_j(request_id)},"role":{_j(role)},"salt":{_j(salt)},'
                f'"seq":{int(seq)},"target":{_j(target)},"time":{_s(_time(time))}}}'
            ).encode()
        yield int(seq), permit_id, permit_seq, prev_hash, digest, body
    cursor.close()
