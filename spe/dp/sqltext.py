"""Text of generated SQL: identifiers re-quoted, literals re-escaped, clamping.

Every fragment the DP engine sends to DuckDB is built from these helpers and allow-listed
plan parts; user text never reaches DuckDB verbatim.
"""

from __future__ import annotations

from typing import Any


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def str_lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"



def clamp_sql(v: str, lo: float, hi: float) -> str:
    """``v`` (a DOUBLE expression or column) clamped to [lo, hi]; NULL for NULL and NaN."""
    return (f"(CASE WHEN {v} IS NULL OR isnan({v}) THEN NULL "
            f"ELSE least(greatest({v}, {lo!r}), {hi!r}) END)")


def value_lit(value: Any) -> str:
    """A public key value as a SQL literal (NULL, boolean, integer, float or text)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str_lit(str(value))
