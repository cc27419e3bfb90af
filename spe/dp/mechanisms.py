"""OpenDP measurements for a query plan: calibration, privacy maps, sampling.

Contract:

* Only OpenDP's ``contrib`` feature is enabled. ``floating-point``, ``honest-but-curious`` and
  ``idealized-numerics`` stay off (:func:`assert_safe_features` is checked on every use).
* :func:`allocate` is a pure function of the plan: it splits the plan's epsilon over the
  measurements the plan needs, builds each OpenDP measurement, and reads its privacy loss
  from the measurement's own privacy map. :func:`price` sums them (sequential composition of
  independently run measurements: epsilons and deltas add). The ledger charges exactly this.
* All statistics are integers before noise: counts, and sums of values quantised to a power of
  two grid ``g = 2^k`` (``round(clamp(x) / g)``), computed exactly by DuckDB as HUGEINT. Noise
  is OpenDP's integer (discrete) Laplace, so a released sum is ``integer * g``: it lies on the
  grid, and float rounding inside the sum cannot exceed the declared sensitivity.
* Non-public group keys are released by OpenDP's Laplace threshold mechanism (spends delta).
* Measurements are built once per (scale[, threshold]) and cached: an OpenDP measurement is an
  immutable description of its domain, metric and calibration, and sampling draws fresh noise
  from OpenDP's CSPRNG on every invocation, so reusing one across releases is the same as
  rebuilding it (only the construction cost is saved).
* Quantiles: OpenDP's report-noisy-max (Gumbel) over quantile scores of candidates on a power
  of two grid; the scores are computed from a per-bin histogram (identical to OpenDP's
  ``make_quantile_score_candidates``, checked by a unit test).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import opendp.mod as dp_mod
import opendp.prelude as dp

from spe.dp.kinds import AggKind, Role, spec
from spe.dp.plan import Aggregate, QueryPlan

UNSAFE_FEATURES = ("floating-point", "honest-but-curious", "idealized-numerics")
ALPHA_DEN = 10_000  # quantile levels are rounded to 1/ALPHA_DEN
CI_Z = math.log(20.0)  # Laplace: P(|noise| > s ln 20) = 5 %
_SLACK = 1.0 + 1e-9  # scales are widened by this factor so maps never exceed the allocation

UnitKind = Literal["laplace", "threshold", "noisy_max"]


def assert_safe_features() -> None:
    """Enable ``contrib`` and refuse to run if any unsafe OpenDP feature is on."""
    dp.enable_features("contrib")
    enabled = set(dp_mod.GLOBAL_FEATURES)
    bad = enabled.intersection(UNSAFE_FEATURES)
    if bad:
        raise RuntimeError(f"unsafe OpenDP features enabled: {sorted(bad)}")


@dataclass(frozen=True)
class Unit:
    """One OpenDP measurement of a plan."""

    role: Role
    agg: int | None  # index into plan.aggregates (None for key selection)
    kind: UnitKind
    d_in: Any  # int, or (l0, l1, linf) for the threshold
    scale: float
    epsilon: float
    delta: float = 0.0
    threshold: int | None = None
    grid: float = 1.0  # value units per integer unit


@dataclass(frozen=True)
class Cost:
    epsilon: float
    delta: float
    units: tuple[Unit, ...]


@functools.lru_cache(maxsize=512)
def _laplace(scale: float) -> dp.Measurement:
    space = dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l1_distance(T=dp.i64)
    return dp.m.make_laplace(*space, scale=scale)


@functools.lru_cache(maxsize=512)
def _threshold(scale: float, threshold: int) -> dp.Measurement:
    domain = dp.map_domain(dp.atom_domain(T=dp.String), dp.atom_domain(T=dp.i64))
    metric = dp.l01inf_distance(dp.absolute_distance(T=dp.i64))
    return dp.m.make_laplace_threshold(domain, metric, scale=scale, threshold=threshold)


@functools.lru_cache(maxsize=512)
def _noisy_max(scale: float) -> dp.Measurement:
    return dp.m.make_noisy_max(dp.vector_domain(dp.atom_domain(T=dp.i64)),
                               dp.linf_distance(T=dp.i64), dp.max_divergence(),
                               scale=scale, negate=True)


def row_bound(agg: Aggregate, squared: bool = False) -> int:
    """Largest |integer| one row contributes to the quantised sum of ``agg``."""
    b = max(abs(agg.lower), abs(agg.upper))
    if squared:
        return math.ceil(b * b / sq_grid(agg))
    return math.ceil(b / sum_grid(agg))


def sum_grid(agg: Aggregate) -> float:
    """Grid of the quantised plain sum: 2^k with B / 2^k in [1024, 2048), B = max |bound|.

    Equal to ``agg.grid`` for SUM, AVG and STDDEV. VARIANCE releases values on the grid of
    B^2 (``agg.grid``), but its plain sum must still be quantised on the grid of B: on the
    grid of B^2 every value would be rounded to a multiple of up to ~B / 4.
    """
    b = max(abs(agg.lower), abs(agg.upper))
    return 1.0 if b == 0 else 2.0 ** math.floor(math.log2(b / 1024.0))


def sq_grid(agg: Aggregate) -> float:
    b = max(abs(agg.lower), abs(agg.upper))
    return 1.0 if b == 0 else 2.0 ** math.floor(math.log2(b * b / 1024.0))


def alpha_num(agg: Aggregate) -> int:
    return round(agg.alpha * ALPHA_DEN)


def distinct_bound(plan: QueryPlan) -> int:
    """L1 bound of one person on the vector of per-group distinct counts (see plan docs)."""
    if not plan.keys:
        return 1
    if plan.public_keys:
        cells = 1
        for key in plan.keys:
            cells *= max(1, len(key.public_values or ()))
        return min(plan.groups_per_person, cells)
    return plan.groups_per_person


def _roles(plan: QueryPlan) -> list[tuple[Role, int | None]]:
    needs: list[tuple[Role, int | None]] = []
    selection = not plan.public_keys
    count_from_selection = False
    if selection:
        needs.append(("select", None))
    for i, agg in enumerate(plan.aggregates):
        counts_rows = agg.kind is AggKind.COUNT and agg.value_sql is None
        if counts_rows and selection and not count_from_selection:
            count_from_selection = True  # answered by the threshold's noisy counts
            continue
        needs += [(role, i) for role in spec(agg.kind, counts_rows=counts_rows).roles]
    return needs


def allocate(plan: QueryPlan) -> tuple[Unit, ...]:
    """The measurements ``plan`` needs, each calibrated to an equal share of its epsilon."""
    assert_safe_features()
    needs = _roles(plan)
    eps_u = plan.epsilon / len(needs)
    k = plan.rows_per_person
    units: list[Unit] = []
    for role, i in needs:
        agg = plan.aggregates[i] if i is not None else None
        if role == "select":
            d_in = (k, k, k)
            scale = k / eps_u * _SLACK
            thr = _calibrate_threshold(scale, d_in, plan.delta)
            eps, delta = _threshold(scale, thr).map(d_in)
            units.append(Unit(role, None, "threshold", d_in, scale, eps, delta, thr))
            continue
        if role == "quantile":
            assert agg is not None
            a = alpha_num(agg)
            d_q = k * max(a, ALPHA_DEN - a)
            scale = 2.0 * d_q / eps_u * _SLACK
            eps = _noisy_max(scale).map(d_q)
            units.append(Unit(role, i, "noisy_max", d_q, scale, eps, grid=agg.grid))
            continue
        if role in ("count", "nvals"):
            d, grid = k, 1.0
        elif role == "distinct":
            d, grid = distinct_bound(plan), 1.0
        elif role == "sum":
            assert agg is not None
            d, grid = k * row_bound(agg), sum_grid(agg)
        else:  # sumsq
            assert agg is not None
            d, grid = k * row_bound(agg, squared=True), sq_grid(agg)
        d = max(int(d), 1)
        scale = d / eps_u * _SLACK
        eps = _laplace(scale).map(d)
        units.append(Unit(role, i, "laplace", d, scale, eps, grid=grid))
    return tuple(units)


def _calibrate_threshold(scale: float, d_in: tuple[int, int, int], delta: float) -> int:
    """Smallest integer threshold whose OpenDP map gives delta <= ``delta``."""
    if delta <= 0:
        from spe.dp.parse import refuse

        raise refuse("non-public group keys with delta = 0",
                     "group by public keys (declared value sets, date parts) or allow delta")
    lo, hi = d_in[2], max(d_in[2] + 1, 1)
    while _threshold(scale, hi).map(d_in)[1] > delta:
        lo, hi = hi, hi * 2
        if hi > 2**40:
            raise RuntimeError("threshold calibration diverged")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _threshold(scale, mid).map(d_in)[1] > delta:
            lo = mid
        else:
            hi = mid
    return hi


def price(plan: QueryPlan) -> Cost:
    """Total (epsilon, delta) of ``plan`` by OpenDP's privacy maps (pure, data-free).

    Grouped quantiles run one noisy-max per released group with the same scale; its map is
    linear in d_in (eps = 2 d_in / scale), so a person whose K rows are spread over groups
    with j_g rows each costs sum_g 2 j_g c / scale = map(K c): the single-unit cost covers
    all groups.
    """
    units = allocate(plan)
    eps = math.fsum(u.epsilon for u in units)
    delta = math.fsum(u.delta for u in units)
    return Cost(epsilon=eps, delta=delta, units=units)


# Sampling --------------------------------------------------------------------------------

def laplace_release(values: list[int], unit: Unit) -> list[int]:
    assert_safe_features()
    if not values:
        return []
    return [int(v) for v in _laplace(unit.scale)([int(v) for v in values])]


def threshold_release(counts: dict[str, int], unit: Unit) -> dict[str, int]:
    assert_safe_features()
    assert unit.threshold is not None
    if not counts:
        return {}
    out = _threshold(unit.scale, unit.threshold)({k: int(v) for k, v in counts.items()})
    return {str(k): int(v) for k, v in out.items()}


def noisy_argmin(scores: list[int], unit: Unit) -> int:
    assert_safe_features()
    return int(_noisy_max(unit.scale)([int(s) for s in scores]))


def quantile_scores(hist: list[int], alpha_numerator: int) -> list[int]:
    """OpenDP's quantile score per candidate from a per-candidate histogram.

    score_j = |(D - a) * #(x < c_j) - a * #(x > c_j)| with alpha = a / D. Adding or removing
    one row changes every score by at most max(a, D - a) (the stability used in allocate).
    """
    total = sum(hist)
    scores = []
    below = 0
    for count in hist:
        above = total - below - count
        scores.append(abs((ALPHA_DEN - alpha_numerator) * below - alpha_numerator * above))
        below += count
    return scores


def ci95_halfwidth(unit: Unit) -> float:
    """Half-width of the 95 % interval of one noisy integer statistic, in value units."""
    return unit.scale * CI_Z * unit.grid
