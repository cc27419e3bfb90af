"""The DP aggregate kinds: one table saying, per kind, which OpenDP measurements it needs,
which exact integer statistics feed them, and how the released value is formed.

Contract: :class:`AggKind` is closed. Every place that dispatches on a kind does it with
``match`` ending in ``assert_never`` (here: :func:`spec`), so adding a member without its
branches is a type error (``mypy`` fails; ``tests/unit/test_dp_kinds.py`` shows it on a copy of
this module). Adding an aggregate means: a member here, its row in :func:`spec`, its
compilation in :mod:`spe.dp.plan`, its statistics in :mod:`spe.dp.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, assert_never

#: One OpenDP measurement of a plan (see :mod:`spe.dp.mechanisms`).
Role = Literal["select", "count", "distinct", "sum", "sumsq", "nvals", "quantile"]
#: Exact statistics the engine computes per group (see :mod:`spe.dp.engine`).
Stat = Literal["rows", "nvals", "sum", "sumsq", "distinct", "histogram"]


class AggKind(StrEnum):
    COUNT = "count"
    COUNT_DISTINCT = "count_distinct"
    SUM = "sum"
    AVG = "avg"
    VARIANCE = "variance"
    STDDEV = "stddev"
    QUANTILE = "quantile"


@dataclass(frozen=True)
class KindSpec:
    roles: tuple[Role, ...]  # measurements, in release order
    stats: tuple[Stat, ...]  # exact integer statistics they read
    release: str  # how the released value is formed from the noisy statistics


def spec(kind: AggKind, *, counts_rows: bool = True) -> KindSpec:
    """The row of ``kind``; ``counts_rows`` distinguishes COUNT(*) from COUNT(expr)."""
    match kind:
        case AggKind.COUNT:
            if counts_rows:
                return KindSpec(("count",), ("rows",), "noisy row count")
            return KindSpec(("nvals",), ("nvals",), "noisy count of non-NULL clamped values")
        case AggKind.COUNT_DISTINCT:
            return KindSpec(("distinct",), ("distinct",),
                            "noisy count of persons, each in at most m groups")
        case AggKind.SUM:
            return KindSpec(("sum",), ("sum",), "noisy quantised sum x grid")
        case AggKind.AVG:
            return KindSpec(("sum", "nvals"), ("sum", "nvals"), "noisy sum / noisy count")
        case AggKind.VARIANCE | AggKind.STDDEV:
            return KindSpec(("sum", "sumsq", "nvals"), ("sum", "sumsq", "nvals"),
                            "from noisy sum, sum of squares and count (sqrt for STDDEV)")
        case AggKind.QUANTILE:
            return KindSpec(("quantile",), ("histogram",),
                            "report-noisy-max over candidates on a power-of-two grid")
        case _:
            assert_never(kind)


#: The table, for documentation and checks (COUNT as COUNT(*)).
KINDS: dict[AggKind, KindSpec] = {kind: spec(kind) for kind in AggKind}

