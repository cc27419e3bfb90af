"""Errors of the permits package that the shared hierarchy does not have (one line each)."""

from __future__ import annotations

from spe.errors import Forbidden, SPEError


class PreconditionRequired(SPEError):
    status, code, title = 428, "precondition-required", "Precondition required"


class PermitNotUsable(Forbidden):
    code, title = "permit-not-usable", "Permit not active"


class NotNamedInPermit(Forbidden):
    code, title = "not-named-in-permit", "Not a person named in the permit"
