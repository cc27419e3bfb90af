"""Text of generated SQL: identifiers re-quoted, literals re-escaped, clamping.

Every fragment the DP engine sends to DuckDB is built from these helpers and allow-listed
plan parts; user text never reaches DuckDB verbatim.
"""

from __future__ import annotations


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def str_lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"



def clamp_sql(v: str, lo: float, hi: float) -> str:
    """``v`` (a DOUBLE expression or column) clamped to [lo, hi]; NULL for NULL and NaN."""
    return (f"(CASE WHEN {v} IS NULL OR isnan({v}) THEN NULL "
            f"ELSE least(greatest({v}, {lo!r}), {hi!r}) END)")
