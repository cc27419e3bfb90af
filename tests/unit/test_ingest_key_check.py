"""The key-uniqueness aggregate of ingest: 0 exactly when the key is distinct and never NULL,
whether it is counted in a bitmap (dense integer keys) or by count(DISTINCT) (sparse or
non-integer keys)."""

from __future__ import annotations

import duckdb
import pytest

from spe.datasets.ingest import _duplicates_check

CASES = [
    ("dense distinct", "BIGINT", "SELECT range FROM range(1, 5001)", 0),
    ("dense duplicate", "BIGINT", "SELECT range % 4999 + 1 FROM range(5000)", 1),
    ("dense with NULL", "INTEGER", "SELECT CASE WHEN range = 7 THEN NULL ELSE range END "
     "FROM range(5000)", 1),
    ("sparse distinct", "BIGINT", "SELECT range * 1000000007 FROM range(5000)", 0),
    ("sparse duplicate", "BIGINT", "SELECT (range % 4990) * 1000000007 FROM range(5000)", 10),
    ("negative and dense", "BIGINT", "SELECT range - 2500 FROM range(5000)", 0),
    ("all NULL", "BIGINT", "SELECT NULL::BIGINT FROM range(3)", 3),
    ("text duplicate", "VARCHAR", "SELECT (range % 10)::VARCHAR FROM range(12)", 2),
]


@pytest.mark.parametrize(("name", "key_type", "values", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_duplicates_check(name: str, key_type: str, values: str, expected: int) -> None:
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t AS SELECT CAST(v AS {key_type}) AS k FROM ({values}) AS s(v)")
    check = _duplicates_check(con, "t", "k", key_type)
    dense = "bitstring_agg" in check
    assert dense == (name.startswith(("dense", "negative"))), check
    got = con.execute(f"SELECT {check} FROM t").fetchone()
    assert got is not None and got[0] == expected
    assert got[0] == con.execute("SELECT count(*) - count(DISTINCT k) FROM t").fetchone()[0]  # type: ignore[index]
