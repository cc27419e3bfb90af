"""The export state machine: the table in spe.airlock.states' docstring, the code's maps and
the mermaid diagram in docs/airlock.md say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spe.airlock import states
from spe.airlock.states import FINAL, OPEN, OWNER, TRANSITIONS, Owner, State, check
from spe.errors import Conflict

DOC = Path(__file__).resolve().parents[2] / "docs" / "airlock.md"


def _doc_table() -> dict[str, tuple[str, set[str]]]:
    assert states.__doc__
    rows = {}
    for line in states.__doc__.splitlines():
        m = re.match(r"^\s+(\w+)\s+\|\s+(\w+)\s+\|\s+(.+?)\s*$", line)
        if m and m.group(1) != "state":
            to = m.group(3)
            targets = set() if to == "(final)" else {t.strip() for t in to.split(",")}
            rows[m.group(1)] = (m.group(2), targets)
    return rows


def _diagram() -> dict[str, set[str]]:
    text = DOC.read_text()
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    edges: dict[str, set[str]] = {s.value: set() for s in State}
    for line in block.splitlines():
        m = re.match(r"^\s*(\S+)\s+-->\s+(\S+)\s*$", line)
        if m and m.group(1) != "[*]" and m.group(2) != "[*]":
            edges.setdefault(m.group(1), set()).add(m.group(2))
    return edges


def test_docstring_table_matches_code() -> None:
    table = _doc_table()
    assert set(table) == {s.value for s in State}
    for state in State:
        owner, targets = table[state.value]
        assert owner == OWNER[state].value, state
        assert targets == {t.value for t in TRANSITIONS[state]}, state


def test_diagram_matches_code() -> None:
    assert _diagram() == {s.value: {t.value for t in TRANSITIONS[s]} for s in State}


def test_docs_owner_table_matches_code() -> None:
    rows = dict(re.findall(r"^\| (\w+) \| (\w+)", DOC.read_text(), re.M))
    for state in State:
        assert rows[state.value] == OWNER[state].value


def test_final_states_have_no_owner_and_open_is_the_rest() -> None:
    assert {s for s in State if OWNER[s] is Owner.NOBODY} == FINAL
    assert set(State) == OPEN | FINAL and not OPEN & FINAL
    assert {State.REJECTED, State.RELEASED, State.WITHDRAWN} == FINAL


def test_every_state_reachable_from_draft() -> None:
    seen, todo = {State.DRAFT}, [State.DRAFT]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(State)


def test_illegal_transitions_say_why() -> None:
    with pytest.raises(Conflict, match="released, which is final"):
        check(State.RELEASED, State.DRAFT)
    with pytest.raises(Conflict, match="it is draft"):
        check(State.DRAFT, State.RELEASED)
    check(State.IN_REVIEW, State.APPROVED)
