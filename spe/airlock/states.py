"""The export request state machine (checked against this table by
tests/unit/test_airlock_states.py, and against the diagram in docs/airlock.md).

Every state, who owns the next step, and where it may go::

    state                 | owner      | to
    ----------------------|------------|------------------------------------------------
    draft                 | researcher | submitted, withdrawn
    submitted             | system     | checked, rejected
    checked               | system     | in_review, released, returned_for_changes, rejected
    in_review             | reviewers  | approved, rejected, returned_for_changes, withdrawn
    returned_for_changes  | researcher | draft, withdrawn
    approved              | system     | released, rejected
    rejected              | nobody     | (final)
    released              | nobody     | (final)
    withdrawn             | nobody     | (final)

* ``submitted -> checked`` runs the automated checks (``spe.airlock.checks``) in the submit
  call; from ``checked`` the request is released at once when every file is covered by a DP
  release receipt of this permit, returned for changes when a blocking check failed (refused
  file kind, limits), otherwise put before the reviewers.
* ``in_review`` is decided when the permit's number of reviewers have voted: all approve ->
  ``approved`` (then ``released`` by the system in the same transaction), any reject ->
  ``rejected``, otherwise ``returned_for_changes``.
* Any open request (not final) is ``rejected`` by the system when its permit is suspended,
  revoked or expired (``approved -> rejected`` too: nothing is released after the permit
  ends); ``submitted -> rejected`` when the permit no longer allows exports.
* A file's bytes never change after upload; ``returned_for_changes -> draft`` lets the
  researcher remove files and add new ones (new bytes, new hashes) before submitting again.
"""

from __future__ import annotations

from enum import StrEnum

from spe.errors import Conflict


class State(StrEnum):
    DRAFT = "draft"
    SUBMITTED = "submitted"
    CHECKED = "checked"
    IN_REVIEW = "in_review"
    RETURNED_FOR_CHANGES = "returned_for_changes"
    APPROVED = "approved"
    REJECTED = "rejected"
    RELEASED = "released"
    WITHDRAWN = "withdrawn"


class Owner(StrEnum):
    RESEARCHER = "researcher"
    SYSTEM = "system"
    REVIEWERS = "reviewers"
    NOBODY = "nobody"


S = State

#: state -> who acts next.
OWNER: dict[State, Owner] = {
    S.DRAFT: Owner.RESEARCHER,
    S.SUBMITTED: Owner.SYSTEM,
    S.CHECKED: Owner.SYSTEM,
    S.IN_REVIEW: Owner.REVIEWERS,
    S.RETURNED_FOR_CHANGES: Owner.RESEARCHER,
    S.APPROVED: Owner.SYSTEM,
    S.REJECTED: Owner.NOBODY,
    S.RELEASED: Owner.NOBODY,
    S.WITHDRAWN: Owner.NOBODY,
}

#: state -> states it may move to.
TRANSITIONS: dict[State, frozenset[State]] = {
    S.DRAFT: frozenset({S.SUBMITTED, S.WITHDRAWN}),
    S.SUBMITTED: frozenset({S.CHECKED, S.REJECTED}),
    S.CHECKED: frozenset({S.IN_REVIEW, S.RELEASED, S.RETURNED_FOR_CHANGES, S.REJECTED}),
    S.IN_REVIEW: frozenset({S.APPROVED, S.REJECTED, S.RETURNED_FOR_CHANGES, S.WITHDRAWN}),
    S.RETURNED_FOR_CHANGES: frozenset({S.DRAFT, S.WITHDRAWN}),
    S.APPROVED: frozenset({S.RELEASED, S.REJECTED}),
    S.REJECTED: frozenset(),
    S.RELEASED: frozenset(),
    S.WITHDRAWN: frozenset(),
}

FINAL = frozenset(s for s, to in TRANSITIONS.items() if not to)
#: States a permit's end closes (everything not final).
OPEN = frozenset(State) - FINAL


def can(current: State, target: State) -> bool:
    return target in TRANSITIONS[current]


def check(current: State, target: State) -> None:
    """Raise Conflict (409) when ``current -> target`` is not in the table."""
    if not can(current, target):
        if current in FINAL:
            why = f"it is {current.value}, which is final"
        else:
            allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current]))
            why = f"it is {current.value} (next: {allowed})"
        raise Conflict(f"This export request cannot become {target.value}: {why}.")
