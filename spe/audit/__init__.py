"""Append-only, hash-chained audit log. ``record`` is the one write path every package uses."""

from spe.audit.events import AuditEvent, Outcome
from spe.audit.writer import record, verify_chain

__all__ = ["AuditEvent", "Outcome", "record", "verify_chain"]
