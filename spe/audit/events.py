"""The typed audit event. Its action is one of :class:`spe.audit.actions.AuditAction`
(``domain.verb``, e.g. ``dataset.ingest``), each with its meaning.

An event records who did what, when, under which permit, to what, and how it ended. It never
holds data values, tokens or secrets: ``details`` is for identifiers, counts, hashes and costs.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from spe.audit.actions import AuditAction

#: Column sizes of ``audit_log``: longer values (often caller-chosen, e.g. a path parameter of
#: a refused request) are cut so the entry is still written (PostgreSQL refuses them).
_MAX_CHARS = {"actor": 255, "role": 64, "permit_id": 64, "target": 255, "request_id": 64}


class Outcome(StrEnum):
    SUCCESS = "success"
    REFUSED = "refused"
    FAILURE = "failure"


class AuditEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    action: AuditAction = Field(description="domain.verb, one of AuditAction")
    actor: str = Field(description="who: Keycloak subject/username, client id, or 'system'")
    role: str | None = Field(None, description="the role the actor acted in")
    permit_id: str | None = Field(None, description="the permit the act was done under")
    target: str | None = Field(None, description="what was acted on (id or name)")
    outcome: Outcome = Outcome.SUCCESS
    reason: str | None = Field(None, description="why it was refused or failed")
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    details: dict[str, Any] = Field(default_factory=dict)
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator(*_MAX_CHARS)
    @classmethod
    def _fit_column(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = _MAX_CHARS[str(info.field_name)]
        if value is not None and len(value) > limit:
            return value[: limit - 1] + "\u2026"
        return value

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("audit time must be timezone-aware")
        return value.astimezone(UTC)
