"""The incident switch: freeze one permit or everything, gather signed evidence, thaw.

Contract
--------
* The switch's state is the audit log itself: ``incident.freeze`` and ``incident.thaw``
  entries (``permit_id`` set, or target ``*`` for all permits). A permit is frozen while the
  latest of those entries naming it, or naming ``*``, is a freeze (a global thaw does not lift
  a permit's own freeze). The state is therefore append-only and tamper-evident like the rest
  of the log: nobody lifts a freeze without a recorded thaw, and every thaw carries a reason.
* :func:`is_frozen` is what enforcement asks: the permit checker of ``spe.auth.permit_checks``
  refuses a frozen permit, so its workspace tokens are refused at their next request (queries,
  token refreshes) and no new token is minted for it. Nothing is deleted: data, workspaces'
  homes, results and the log are kept for evidence.
* :func:`evidence` builds a bundle for the access body: a fresh signed checkpoint, the public
  keys, every held checkpoint with the consistency proof to the fresh one, the permit's entries
  with inclusion proofs (``spe.audit.proofs.permit_bundle``), the permit's DP release
  receipts (:func:`release_receipts`) and what the caller adds (e.g. permit versions, the
  airlock requests' receipts); the whole bundle is signed with the checkpoint key.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from spe.audit.actions import AuditAction
from spe.audit.checkpoints import CheckpointLog, KeyStore
from spe.audit.events import AuditEvent
from spe.audit.models import AuditEntry
from spe.audit.proofs import consistency, create_checkpoint, permit_bundle
from spe.audit.writer import record
from spe.db import Database

ALL = "*"
_SWITCH = (AuditAction.INCIDENT_FREEZE.value, AuditAction.INCIDENT_THAW.value)


def _latest(session: Session, permit_id: str | None) -> str | None:
    where: ColumnElement[bool]
    if permit_id is None:
        where = (AuditEntry.target == ALL) & AuditEntry.permit_id.is_(None)
    else:
        where = AuditEntry.permit_id == permit_id
    return session.execute(select(AuditEntry.action).where(
        AuditEntry.action.in_(_SWITCH), AuditEntry.outcome == "success", where)
        .order_by(AuditEntry.seq.desc()).limit(1)).scalar()


def is_frozen(session: Session, permit_id: str) -> bool:
    """Whether ``permit_id`` is frozen (by its own freeze or a freeze of all permits)."""
    if _latest(session, permit_id) == AuditAction.INCIDENT_FREEZE.value:
        return True
    return _latest(session, None) == AuditAction.INCIDENT_FREEZE.value


def frozen_state(session: Session) -> dict[str, Any]:
    """``{"all": bool, "permits": [ids frozen on their own]}``."""
    ids = session.execute(select(AuditEntry.permit_id).where(
        AuditEntry.action.in_(_SWITCH), AuditEntry.permit_id.is_not(None))
        .distinct()).scalars()
    own = sorted(str(p) for p in ids if _latest(session, str(p)) == _SWITCH[0])
    return {"all": _latest(session, None) == _SWITCH[0], "permits": own}


def _switch(db: Database, action: AuditAction, *, actor: str, role: str | None,
            permit_id: str | None, reason: str) -> int:
    if not reason.strip():
        raise ValueError("an incident freeze or thaw needs a reason")
    with db.write() as session:
        entry = record(session, AuditEvent(
            action=action, actor=actor, role=role, permit_id=permit_id,
            target=permit_id or ALL, reason=reason[:1000],
            details={"scope": "permit" if permit_id else "all"}))
        return int(entry.seq)


def freeze(db: Database, *, actor: str, role: str | None, permit_id: str | None,
           reason: str) -> int:
    """Freeze one permit (or all with ``permit_id=None``); returns the entry's number."""
    return _switch(db, AuditAction.INCIDENT_FREEZE, actor=actor, role=role,
                   permit_id=permit_id, reason=reason)


def thaw(db: Database, *, actor: str, role: str | None, permit_id: str | None,
         reason: str) -> int:
    """Lift a freeze (a recorded reason is required); returns the entry's number."""
    return _switch(db, AuditAction.INCIDENT_THAW, actor=actor, role=role,
                   permit_id=permit_id, reason=reason)


def release_receipts(session: Session, permit_id: str) -> list[dict[str, Any]]:
    """The DP release receipts of ``permit_id``'s answered queries, from their audit entries
    (``dp.query`` successes): what each receipt signs (file hashes, charge, cost, time, rows,
    column names), with the entry's number. Entries written before whole receipts were
    recorded give the CSV hash and charge id only."""
    out = []
    for seq, time, actor, details in session.execute(
            select(AuditEntry.seq, AuditEntry.time, AuditEntry.actor, AuditEntry.details)
            .where(AuditEntry.permit_id == permit_id, AuditEntry.action == "dp.query",
                   AuditEntry.outcome == "success").order_by(AuditEntry.seq)):
        details = details or {}
        receipt = details.get("receipt") or (
            {"charge_id": details.get("charge_id"),
             "sha256_csv": details.get("receipt_sha256_csv")}
            if details.get("receipt_sha256_csv") else None)
        if receipt:
            out.append({"audit_seq": int(seq), "time": time.isoformat(), "actor": actor,
                        "receipt": receipt})
    return out


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def evidence(db: Database, keys: KeyStore, log: CheckpointLog, origin: str, permit_id: str,
             *, actor: str, role: str | None,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A signed evidence bundle for ``permit_id`` (see module docstring)."""
    with db.write() as session:
        record(session, AuditEvent(action=AuditAction.INCIDENT_EVIDENCE, actor=actor,
                                   role=role, permit_id=permit_id, target=permit_id))
    with db.read() as session:
        cp = create_checkpoint(session, keys, log, origin)
        held = [c for c in log.all() if c.size <= cp.size and c != cp]
        data_dir = log.path.parent.parent  # retention archives, once entries are archived
        proofs = [{"checkpoint": c.to_json(),
                   "proof": consistency(session, c.size, cp.size, data_dir)} for c in held]
        bundle = permit_bundle(session, cp, permit_id, data_dir)
        state = frozen_state(session)
        receipts = release_receipts(session, permit_id)
    body: dict[str, Any] = {
        "kind": "spe-incident-evidence", "version": 1, "permit_id": permit_id,
        "created": datetime.now(UTC).isoformat(timespec="microseconds"),
        "created_by": actor, "origin": origin, "checkpoint": cp.to_json(),
        "keys": [vars(k) for k in keys.public_keys()], "held_checkpoints": proofs,
        "audit": bundle, "incident_state": state, "dp_release_receipts": receipts,
        **(extra or {}),
    }
    key_id, private = keys.current()
    return {"bundle": body, "key_id": key_id,
            "signature": base64.b64encode(private.sign(_canonical(body))).decode()}


def verify_evidence_signature(signed: dict[str, Any]) -> bool:
    """The bundle's signature against the key it names (from the bundle's own key list:
    compare that list with the keys you hold)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    body = signed["bundle"]
    key = next((k for k in body["keys"] if k["key_id"] == signed["key_id"]), None)
    if key is None:
        return False
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"]))
    try:
        public.verify(base64.b64decode(signed["signature"]), _canonical(body))
    except InvalidSignature:
        return False
    return True
