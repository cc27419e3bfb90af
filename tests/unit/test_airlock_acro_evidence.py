"""ACRO results.json parsing: only ACRO's shape is evidence, and evidence never passes."""

from __future__ import annotations

import json

from spe.airlock.acro_evidence import TEXT, parse


def test_shapes_that_are_not_acro_results() -> None:
    for doc in ({}, {"results": {}}, {"results": {"o": {"status": 3}}}, [1, 2],
                {"results": {"o": {"status": "pass", "files": "x.csv"}}}):
        assert parse(json.dumps(doc).encode()) is None
    assert parse(b"not json") is None


def test_evidence_is_never_a_pass_and_text_is_bounded() -> None:
    doc = {"version": "0.4.8", "results": {"output_0": {
        "uid": "output_0", "status": "pass", "type": "table", "summary": "pass",
        "properties": {"method": "pivot_table"}, "exception": "x" * 5000,
        "files": [{"name": "output_0_0.csv", "sdc": {"summary": {"threshold": 0,
                                                                  "nk-rule": "many"}}}]}}}
    got = parse(json.dumps(doc).encode())
    assert got is not None and got.missing({"output_0_0.csv"}) == []
    check = got.evidence("output_0_0.csv")
    assert check is not None and check.outcome == "needs_review"
    assert len(check.details["exception_requested"]) == TEXT
    assert check.details["sdc"] == {"threshold": 0}  # only ACRO's counters, as numbers
    assert got.evidence("other.csv") is None
