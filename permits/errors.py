"""Errors of the permits package that the shared hierarchy does not have (one line each)."""

from __future__ import annotations

from spe.errors import SPEError


class PreconditionRequired(SPEError):
    status, code, title = 428, "precondition-required", "Precondition required"
