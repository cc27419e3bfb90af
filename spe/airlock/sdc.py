"""Statistical disclosure control rules for tables, as small pure functions.

The rules and defaults are ACRO's (the SACRO project's library): a cell is disclosive when it
counts fewer than ``threshold`` (10) contributors; when its largest ``n`` (2) contributors hold
more than ``k`` (90 %) of its total (dominance, N-K rule); when the total less the two largest
contributions is within ``p`` (10 %) of the largest (p-percent rule, so the second largest can
estimate the largest too closely); zeros are flagged (structural or not, a reviewer decides).
``acro`` itself pins an older pandas, so these are re-stated here and tested against ACRO's
documented examples (tests/unit/test_airlock_sdc.py).

Dominance and p-percent need each cell's contributions, which only the data side has: they
apply to tables that come with contributor evidence; a plain CSV gets threshold and zero
checks, differencing and human review.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

THRESHOLD = 10
DOMINANCE_N = 2
DOMINANCE_K = 0.9
P_RATIO = 0.1


def below_threshold(count: float, threshold: int = THRESHOLD) -> bool:
    """A cell counting 1 to ``threshold - 1`` contributors (zero is :func:`is_zero`'s)."""
    return 0 < count < threshold


def is_zero(count: float) -> bool:
    return count == 0


def dominated(contributions: Sequence[float], n: int = DOMINANCE_N,
              k: float = DOMINANCE_K) -> bool:
    """N-K rule: the ``n`` largest contributions hold more than ``k`` of the cell's total."""
    values = sorted((abs(v) for v in contributions), reverse=True)
    total = sum(values)
    if total <= 0:
        return False
    return sum(values[:n]) > k * total


def p_ratio_fails(contributions: Sequence[float], p: float = P_RATIO) -> bool:
    """p-percent rule: total minus the two largest is less than ``p`` of the largest."""
    values = sorted((abs(v) for v in contributions), reverse=True)
    if not values or values[0] <= 0:
        return False
    rest = sum(values) - values[0] - (values[1] if len(values) > 1 else 0.0)
    return rest < p * values[0]


def residual_dof_too_small(observations: int, parameters: int, minimum: int = THRESHOLD
                           ) -> bool:
    """A regression with fewer than ``minimum`` residual degrees of freedom is disclosive."""
    return observations - parameters < minimum


@dataclass(frozen=True)
class Difference:
    """A cell (or the total) of a new table that differs from a released one by 1 to 9."""

    key: tuple[str, ...]
    column: str
    delta: float


def differences(new: Mapping[tuple[str, ...], Mapping[str, float]],
                released: Mapping[tuple[str, ...], Mapping[str, float]],
                threshold: int = THRESHOLD) -> list[Difference]:
    """Cells and column totals of ``new`` that differ from ``released`` by 1 to
    ``threshold - 1``: subtracting one table from the other would reveal a small group.

    Both are {row key: {count column: value}}; only keys and columns present in both are
    compared cell by cell, and every column present in both is compared by its total (a
    margin)."""
    found: list[Difference] = []
    columns = _columns(new) & _columns(released)
    for key in sorted(set(new) & set(released)):
        for column in sorted(columns):
            a, b = new[key].get(column), released[key].get(column)
            if a is not None and b is not None and 0 < abs(a - b) < threshold:
                found.append(Difference(key, column, a - b))
    for column in sorted(columns):
        total_new = sum(row.get(column, 0.0) for row in new.values())
        total_old = sum(row.get(column, 0.0) for row in released.values())
        if 0 < abs(total_new - total_old) < threshold:
            found.append(Difference(("<total>",), column, total_new - total_old))
    return found


def _columns(table: Mapping[tuple[str, ...], Mapping[str, float]]) -> set[str]:
    out: set[str] = set()
    for row in table.values():
        out.update(row)
    return out


def small_cells(values: Iterable[float], threshold: int = THRESHOLD) -> tuple[int, int]:
    """(cells below threshold, zero cells) among ``values``."""
    small = zeros = 0
    for v in values:
        if below_threshold(v, threshold):
            small += 1
        elif is_zero(v):
            zeros += 1
    return small, zeros
