"""The permit state machine (checked against this table by tests/unit/test_permit_states.py).

Recorded statuses are ``active``, ``suspended``, ``revoked`` and ``expired``. The *effective*
status is computed on every read from the recorded status and the clock::

    revoked or expired (recorded)      -> as recorded (final)
    now >= valid_until                 -> expired
    suspended (recorded)               -> suspended
    now < valid_from                   -> pending
    otherwise                          -> active

Transitions are checked against the effective status:

    action   | from (effective)            | to
    ---------|-----------------------------|----------
    issue    | (new)                       | active
    amend    | active, pending, suspended  | unchanged
    extend   | active, pending, suspended  | unchanged
    suspend  | active, pending             | suspended
    resume   | suspended                   | active
    revoke   | active, pending, suspended  | revoked
    expire   | expired                     | expired

``expire`` is done only by the expiry sweeper (``permits.expiry``): it records the status the
clock has already made effective. ``extend`` is allowed once per permit. Anything else is a
409 Conflict whose detail says why.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from permits.terms import PermitStatus
from spe.errors import Conflict

S = PermitStatus


class Action(StrEnum):
    ISSUE = "issue"
    AMEND = "amend"
    EXTEND = "extend"
    SUSPEND = "suspend"
    RESUME = "resume"
    REVOKE = "revoke"
    EXPIRE = "expire"


#: action -> effective statuses it is allowed from.
ALLOWED_FROM: dict[Action, frozenset[PermitStatus]] = {
    Action.ISSUE: frozenset(),
    Action.AMEND: frozenset({S.ACTIVE, S.PENDING, S.SUSPENDED}),
    Action.EXTEND: frozenset({S.ACTIVE, S.PENDING, S.SUSPENDED}),
    Action.SUSPEND: frozenset({S.ACTIVE, S.PENDING}),
    Action.RESUME: frozenset({S.SUSPENDED}),
    Action.REVOKE: frozenset({S.ACTIVE, S.PENDING, S.SUSPENDED}),
    Action.EXPIRE: frozenset({S.EXPIRED}),
}

#: action -> recorded status afterwards (None: unchanged).
RESULT: dict[Action, PermitStatus | None] = {
    Action.ISSUE: S.ACTIVE,
    Action.AMEND: None,
    Action.EXTEND: None,
    Action.SUSPEND: S.SUSPENDED,
    Action.RESUME: S.ACTIVE,
    Action.REVOKE: S.REVOKED,
    Action.EXPIRE: S.EXPIRED,
}

_WHY: dict[PermitStatus, str] = {
    S.REVOKED: "the permit has been revoked; revocation is final",
    S.EXPIRED: "the permit has expired; an expired permit cannot change",
    S.SUSPENDED: "the permit is already suspended",
    S.ACTIVE: "the permit is active, not suspended",
    S.PENDING: "the permit's access period has not started and it is not suspended",
}


def effective_status(recorded: str, valid_from: datetime, valid_until: datetime,
                     now: datetime) -> PermitStatus:
    """The status in force at ``now`` (see the module docstring)."""
    status = PermitStatus(recorded)
    if status in (S.REVOKED, S.EXPIRED):
        return status
    if now >= valid_until:
        return S.EXPIRED
    if status is S.SUSPENDED:
        return S.SUSPENDED
    if now < valid_from:
        return S.PENDING
    return S.ACTIVE


def can(action: Action, status: PermitStatus) -> bool:
    return status in ALLOWED_FROM[action]


def check(action: Action, status: PermitStatus) -> None:
    """Raise Conflict (409) when ``action`` is not allowed from effective ``status``."""
    if not can(action, status):
        raise Conflict(f"Cannot {action.value} this permit: {_WHY[status]}.")


def next_status(action: Action, recorded: PermitStatus) -> PermitStatus:
    result = RESULT[action]
    return recorded if result is None else result
