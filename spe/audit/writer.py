"""Append audit events to the hash chain, in the caller's transaction.

``record(session, event)`` must be called inside the transaction that performs the act, so the
act and its audit entry commit or roll back together. Appends are serialised by an UPDATE of the
single ``audit_head`` row (a row lock on PostgreSQL, the database write lock on SQLite), so the
chain has no forks even under concurrent writers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from spe.audit.events import AuditEvent
from spe.audit.models import GENESIS_HASH, AuditEntry, AuditHead


def _canonical(seq: int, prev_hash: str, fields: dict[str, Any]) -> bytes:
    body = {"seq": seq, "prev_hash": prev_hash, **fields}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def _fields(event: AuditEvent) -> dict[str, Any]:
    return {
        "time": event.time.isoformat(timespec="microseconds"),
        "actor": event.actor,
        "role": event.role,
        "permit_id": event.permit_id,
        "action": event.action,
        "target": event.target,
        "outcome": event.outcome.value,
        "reason": event.reason,
        "request_id": event.request_id,
        "details": event.details,
    }


def entry_hash(seq: int, prev_hash: str, fields: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(seq, prev_hash, fields)).hexdigest()


def record(session: Session, event: AuditEvent) -> AuditEntry:
    """Append ``event`` to the chain inside ``session``'s open transaction."""
    fields = _fields(event)
    # Round-trip details through JSON so what is hashed is exactly what is stored.
    fields["details"] = json.loads(json.dumps(fields["details"], default=str))
    head = session.execute(
        update(AuditHead)
        .where(AuditHead.id == 1)
        .values(seq=AuditHead.seq + 1)
        .returning(AuditHead.seq, AuditHead.last_hash)
    ).one_or_none()
    if head is None:
        raise RuntimeError("audit chain head missing: run `spe db upgrade`")
    seq, prev = int(head[0]), str(head[1])
    digest = entry_hash(seq, prev, fields)
    entry = AuditEntry(
        seq=seq,
        time=event.time,
        actor=event.actor,
        role=event.role,
        permit_id=event.permit_id,
        action=event.action,
        target=event.target,
        outcome=event.outcome.value,
        reason=event.reason,
        request_id=event.request_id,
        details=fields["details"],
        prev_hash=prev,
        entry_hash=digest,
    )
    session.add(entry)
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(last_hash=digest))
    session.flush()
    return entry


def entry_fields(entry: AuditEntry) -> dict[str, Any]:
    return {
        "time": entry.time.isoformat(timespec="microseconds"),
        "actor": entry.actor,
        "role": entry.role,
        "permit_id": entry.permit_id,
        "action": entry.action,
        "target": entry.target,
        "outcome": entry.outcome,
        "reason": entry.reason,
        "request_id": entry.request_id,
        "details": entry.details,
    }


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str | None = None


def _check(entries: Iterable[AuditEntry], head: AuditHead | None) -> ChainReport:
    prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    for entry in entries:
        count += 1
        if entry.seq != expected_seq:
            return ChainReport(False, count, expected_seq, "entry missing from the sequence")
        if entry.prev_hash != prev:
            return ChainReport(False, count, entry.seq, "previous-hash link broken")
        if entry_hash(entry.seq, entry.prev_hash, entry_fields(entry)) != entry.entry_hash:
            return ChainReport(False, count, entry.seq, "entry content changed")
        prev = entry.entry_hash
        expected_seq += 1
    if head is not None and (head.seq != count or head.last_hash != prev):
        return ChainReport(False, count, count + 1, "entries removed from the end of the chain")
    return ChainReport(True, count)


def verify_chain(session: Session) -> ChainReport:
    """Recompute every link; report the first entry where the chain breaks."""
    head = session.get(AuditHead, 1)
    entries = session.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars()
    return _check(entries, head)
