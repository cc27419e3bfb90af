"""The permit state machine: the table in permits.states' docstring is what the code does."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from permits import states
from permits.states import ALLOWED_FROM, RESULT, Action, check, effective_status, next_status
from permits.terms import PermitStatus
from spe.errors import Conflict

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(days=365)


def _doc_table() -> dict[str, tuple[set[str], str]]:
    assert states.__doc__
    rows = {}
    for line in states.__doc__.splitlines():
        m = re.match(r"^\s+(\w+)\s+\|\s+([^|]+?)\s+\|\s+(\w+)\s*$", line)
        if m and m.group(1) != "action":
            froms = {s.strip() for s in m.group(2).split(",")} - {"(new)"}
            rows[m.group(1)] = (froms, m.group(3))
    return rows


def test_docstring_table_matches_code() -> None:
    table = _doc_table()
    assert set(table) == {a.value for a in Action}
    for action in Action:
        froms, to = table[action.value]
        assert froms == {s.value for s in ALLOWED_FROM[action]}, action
        result = RESULT[action]
        assert to == ("unchanged" if result is None else result.value), action


@pytest.mark.parametrize(("recorded", "now", "expected"), [
    ("active", T0 - timedelta(seconds=1), "pending"),
    ("active", T0, "active"),
    ("active", T1, "expired"),
    ("suspended", T0 - timedelta(days=1), "suspended"),
    ("suspended", T1, "expired"),
    ("revoked", T0, "revoked"),
    ("revoked", T1, "revoked"),
    ("expired", T0, "expired"),
])
def test_effective_status(recorded: str, now: datetime, expected: str) -> None:
    assert effective_status(recorded, T0, T1, now).value == expected


def test_illegal_transitions_say_why() -> None:
    with pytest.raises(Conflict, match="revocation is final"):
        check(Action.RESUME, PermitStatus.REVOKED)
    with pytest.raises(Conflict, match="expired"):
        check(Action.AMEND, PermitStatus.EXPIRED)
    with pytest.raises(Conflict, match="already suspended"):
        check(Action.SUSPEND, PermitStatus.SUSPENDED)
    with pytest.raises(Conflict, match="not suspended"):
        check(Action.RESUME, PermitStatus.ACTIVE)
    for action in Action:
        for status in PermitStatus:
            if status in ALLOWED_FROM[action]:
                check(action, status)
                assert next_status(action, PermitStatus.ACTIVE) in PermitStatus
            else:
                with pytest.raises(Conflict):
                    check(action, status)


def test_final_states_have_no_way_out() -> None:
    for final in (PermitStatus.REVOKED, PermitStatus.EXPIRED):
        allowed = [a for a in Action if final in ALLOWED_FROM[a] and a is not Action.EXPIRE]
        assert allowed == []
