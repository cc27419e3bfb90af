"""pytest plugin that scripts/test.sh loads (``-p tests.suite_summary``): before pytest's own
closing line, a short table of what ran, by kind of test (the folder under ``tests/``: unit,
integration, security, stat, e2e...) plus the browser and fuzz tests wherever they live (a
``browser``/``fuzz`` marker or the word in the test file's name).

It only reports: pytest's closing line and exit status are untouched (5 when no test ran).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest

_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
_OUTCOMES: dict[str, str] = {}
_KINDS: dict[str, set[str]] = defaultdict(set)
ACROSS = ("browser", "fuzz")


def _kinds(item_or_report: Any, nodeid: str) -> set[str]:
    path = nodeid.split("::", 1)[0]
    parts = path.split("/")
    kinds = {parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"}
    keywords = getattr(item_or_report, "keywords", {}) or {}
    for word in ACROSS:
        if word in keywords or word in parts[-1]:
            kinds.add(word)
    return kinds


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        outcome = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        return
    previous = _OUTCOMES.get(report.nodeid)
    if previous is None or _RANK[outcome] > _RANK[previous]:
        _OUTCOMES[report.nodeid] = outcome
    _KINDS[report.nodeid] |= _kinds(report, report.nodeid)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int) -> None:
    write = terminalreporter.write_line
    terminalreporter.write_sep("-", "what ran, by kind")
    if not _OUTCOMES:
        write(f"no test ran (pytest exit status {int(exitstatus)})")
        return
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for nodeid, outcome in _OUTCOMES.items():
        for kind in _KINDS[nodeid]:
            table[kind][outcome] += 1
    order = sorted(k for k in table if k not in ACROSS) + [k for k in ACROSS if k in table]
    for kind in order:
        counts = table[kind]
        line = (f"{kind:<12} {counts['passed']:>5} passed  {counts['failed']:>3} failed  "
                f"{counts['skipped']:>4} skipped")
        if counts["error"]:
            line += f"  {counts['error']} errors"
        write(line)
