"""Where the permits package tells the identity package whether a permit is active.

Contract: a permit checker is ``fn(session, permit_id) -> bool``, True only while the permit
is active (not suspended, revoked or expired). The permits package registers one at import
with :func:`register_permit_checker`; an app may override it by putting a checker in the
app's state (``state.put(CHECKER_KEY, fn)``). When none is registered, workspace tokens are
refused: safe by default. Whatever the checker, a permit frozen by the incident switch
(``spe.audit.incident``) is not active.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from spe.api.state import StateKey

PermitChecker = Callable[[Session, str], bool]

CHECKER_KEY: StateKey[PermitChecker] = StateKey("auth.permit_checker")
_registered: PermitChecker | None = None


def register_permit_checker(fn: PermitChecker | None) -> None:
    """Register the process-wide permit checker (``None`` removes it)."""
    global _registered
    _registered = fn


def get_permit_checker(extras: Mapping[str, Any] | None = None) -> PermitChecker | None:
    """The app's checker if set in ``extras`` (the state's slots by name), else the
    registered one, else None."""
    found: PermitChecker | None = _registered
    if extras is not None:
        override = extras.get(CHECKER_KEY.name)
        if override is not None:
            found = override
    return None if found is None else _unless_frozen(found)


def _unless_frozen(checker: PermitChecker) -> PermitChecker:
    """``checker``, and False for a permit frozen by the incident switch (spe.audit.incident)."""
    from spe.audit.incident import is_frozen

    def check(session: Session, permit_id: str) -> bool:
        return not is_frozen(session, permit_id) and bool(checker(session, permit_id))

    return check


def permit_is_active(session: Session, permit_id: str,
                     extras: Mapping[str, Any] | None = None) -> bool:
    """True only when a checker is registered and says the permit is active."""
    checker = get_permit_checker(extras)
    if checker is None:
        return False
    return bool(checker(session, permit_id))
