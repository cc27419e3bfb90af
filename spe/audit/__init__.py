"""Append-only, hash-chained audit log. ``record`` is the one write path every package uses;
``record_refusal`` the one helper for refusals; ``AuditAction`` every action it may hold."""

from spe.audit.actions import MEANINGS, AuditAction
from spe.audit.events import AuditEvent, Outcome
from spe.audit.refusals import record_refusal
from spe.audit.writer import record, verify_chain

__all__ = ["MEANINGS", "AuditAction", "AuditEvent", "Outcome", "record", "record_refusal",
           "verify_chain"]
