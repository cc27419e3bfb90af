"""The one helper that records a refusal in the audit log.

Contract: :func:`record_refusal` writes one entry (outcome ``refused``, or ``failure`` for a
5xx) in its own transaction, with who, which action, which permit, what and why, plus only
identifiers and the status in ``details``: never the request body or any data value. It never
raises: a refusal that could not be audited is logged, and the caller's refusal goes out as it
would have.
"""

from __future__ import annotations

import logging
from typing import Any

from spe.audit.actions import AuditAction
from spe.audit.events import AuditEvent, Outcome
from spe.audit.writer import record
from spe.db import Database

logger = logging.getLogger("spe.audit")


def record_refusal(db: Database, action: AuditAction | str, *, actor: str | None,
                   role: str | None, reason: str, status: int | None = None,
                   permit_id: str | None = None, target: str | None = None,
                   request_id: str | None = None,
                   details: dict[str, Any] | None = None) -> None:
    """Audit one refusal (``status`` >= 500 is recorded as a failure; ``status`` goes into
    the details when given)."""
    try:
        event = AuditEvent(
            action=AuditAction(action), actor=actor or "anonymous", role=role,
            permit_id=permit_id, target=target or permit_id,
            outcome=Outcome.FAILURE if status and status >= 500 else Outcome.REFUSED,
            reason=reason[:1000], request_id=request_id or "none",
            details={**({"status": status} if status else {}), **(details or {})})
        with db.write() as session:
            record(session, event)
    except Exception:
        logger.exception("could not audit a refusal", extra={"fields": {"action": str(action)}})
