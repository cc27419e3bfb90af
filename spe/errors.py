"""One exception hierarchy for the SPE; the API maps each class to an RFC 9457 problem.

Messages are written for the person who made the request: they say what is wrong and what
to do, and never contain data values, tokens or secrets.
"""

from __future__ import annotations

from typing import Any


class SPEError(Exception):
    """Base class. ``status`` is the HTTP status, ``code`` a stable machine-readable slug.
    ``audited`` is set by code that has already recorded this refusal in the audit log, so the
    audited route (``spe.api.routing.AuditedRoute``) does not record it a second time."""

    audited = False
    status = 500
    code = "internal-error"
    title = "Internal error"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class InvalidInput(SPEError):
    status, code, title = 422, "invalid-input", "Invalid input"


class NotAuthenticated(SPEError):
    status, code, title = 401, "not-authenticated", "Not authenticated"


class Forbidden(SPEError):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(SPEError):
    status, code, title = 404, "not-found", "Not found"


class Conflict(SPEError):
    status, code, title = 409, "conflict", "Conflict"


class PreconditionFailed(SPEError):
    status, code, title = 412, "precondition-failed", "Precondition failed"


class PayloadTooLarge(SPEError):
    status, code, title = 413, "payload-too-large", "Payload too large"


class BudgetExceeded(SPEError):
    status, code, title = 403, "budget-exceeded", "Privacy budget exceeded"


class QueryRefused(SPEError):
    status, code, title = 400, "query-refused", "Query refused"


class IngestError(InvalidInput):
    code, title = "ingest-error", "Dataset ingest failed"


class ServiceUnavailable(SPEError):
    status, code, title = 503, "service-unavailable", "Service unavailable"
