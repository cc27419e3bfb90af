"""Run a plan on DuckDB and release the noisy table.

Contract: :func:`execute` takes a :class:`~spe.dp.plan.QueryPlan`, the units from
:func:`spe.dp.mechanisms.allocate` (already paid for) and a locked-down connection from
:mod:`spe.dp.duck`; it generates SQL from the plan, fetches exact integer statistics, adds
OpenDP noise and returns a :class:`Release`. The output's shape depends only on the plan
(public keys: every declared key, empty groups included) or on DP outputs (keys released by
the threshold). HAVING / ORDER BY / LIMIT run afterwards on the noisy table only.

Stability arguments (what one person can change in the statistics fed to OpenDP):

* Row statistics (COUNT, SUM, AVG, VARIANCE, quantile histograms) are computed on rows that
  pass ``_spe_row_rank <= k_t`` for every person-level table. After inner joins on person_id
  one person has at most K = prod(k_t) rows (joins to reference tables on a unique key add
  none), so over all groups one person changes counts by at most K in L1 (and in at most K
  groups), quantised sums by at most K * ceil(B / g) where B bounds |clamped value|.
  Self-joins are covered: each copy of the table is filtered and counted in the product.
* COUNT(DISTINCT person_id) is computed without row truncation (exact; over a join of two or
  more truncated tables on the truncated rows, see distinct_sql); a person adds
  at most 1 per group and is kept in at most m groups (salted-hash choice), so L1 <= m.
* A person-level table whose ingest-checked unique key is ``person_id`` (OMOP ``person``)
  has at most one row per person: it gets no rank filter and counts 1 in K (see plan).

WHERE and truncation (utility trade-off). The rank filter ``_spe_row_rank <= k`` and the WHERE
are applied together, i.e. the k rows are drawn among *all* the person's rows and only then
filtered. A person with many rows of which few match a selective filter is undercounted
(expected kept matches = k * matches / rows). What is and is not affected:

* Filters on one-row-per-person tables only (``person``: gender, year of birth), and filters
  on reference tables joined on their key, are exact: those tables are never truncated, and
  the truncated table's kept rows do not depend on them.
* When k >= the person's number of rows, nothing is truncated and any filter is exact; the
  declared k should be set with that in mind (cost grows linearly in k).
* The sound fix for selective filters on a truncated table is "filter, then truncate": rank
  the *matching* rows of the (single) truncated table by their ingest rank and keep the first
  k (``row_number() OVER (PARTITION BY person_id ORDER BY _spe_row_rank) <= k`` over the
  filtered join). Its stability is the same (at most k kept rows per person, as long as every
  other table in the join is row-preserving: one-row-per-person or a reference table on its
  unique key). It is not the default because it reintroduces a per-query window over the
  filtered rows (cheap for selective filters, up to the ~30x cost of query-time truncation
  for unselective ones). Choosing between the two plans by looking at the data (e.g. at the
  filter's selectivity) is NOT allowed: a data-dependent choice of the statistic breaks the
  sensitivity argument between neighbouring datasets. Any such mode must be chosen by the
  researcher (an explicit, data-independent option), which is future work.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, assert_never

import duckdb
import pandas as pd

from spe.config import Settings
from spe.dp import mechanisms as mech
from spe.dp.duck import Deadline, connect_memory, run, run_df
from spe.dp.kinds import AggKind
from spe.dp.mechanisms import Unit
from spe.dp.plan import Aggregate, QueryPlan
from spe.dp.sqltext import clamp_sql, value_lit

PID = "_spe_pid"


@dataclass
class Release:
    """The noisy answer: the table plus, per column and per cell, how it was produced."""

    table: pd.DataFrame
    accuracy: dict[str, dict[str, Any]]  # column -> mechanism, scale, ci95 half-width
    cells: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # per row


def _base_where(plan: QueryPlan, truncate: bool, public_filter: bool = True) -> str:
    parts = [plan.truncation_sql] if truncate and plan.truncation_sql != "TRUE" else []
    if plan.where_sql:
        parts.append(f"({plan.where_sql})")
    if public_filter:
        for key in plan.keys:
            if key.public_values is not None:
                vals = ", ".join(value_lit(v) for v in key.public_values)
                parts.append(f"({key.sql} IN ({vals}))")
    return " AND ".join(parts) if parts else "TRUE"


def _key_cols(plan: QueryPlan) -> list[str]:
    return [f"{k.sql} AS g{i}" for i, k in enumerate(plan.keys)]


def _group_by(plan: QueryPlan) -> str:
    return (" GROUP BY " + ", ".join(f"g{i}" for i in range(len(plan.keys)))) if plan.keys \
        else ""


def _int_type(bound: int) -> str:
    """Narrowest SQL integer type holding every per-row value in [-bound, bound] (plan only)."""
    return "INTEGER" if bound < 2**31 - 1 else "BIGINT"


def _q_sum(v: str, grid: float, bound: int) -> str:
    """Sum of ``round(v / grid)`` over rows; ``v`` is already clamped so |round| <= bound."""
    return f"SUM(CAST(round({v} / {grid!r}) AS {_int_type(bound)}))"


def _clamp_finite(x: str, lo: float, hi: float) -> str:
    """``x`` clamped to [lo, hi] for rows already known to be neither NULL nor NaN.

    Equal to :func:`~spe.dp.plan.clamp_sql` on such rows (-inf goes to lo, +inf to hi); two
    comparisons are cheaper in DuckDB than ``least(greatest(...))``.
    """
    lo_d, hi_d = _dbl(lo), _dbl(hi)
    return f"(CASE WHEN {x} < {lo_d} THEN {lo_d} WHEN {x} > {hi_d} THEN {hi_d} ELSE {x} END)"


def _dbl(value: float) -> str:
    """A DOUBLE literal (a bare ``0.1`` would be a DECIMAL in DuckDB, divided exactly)."""
    return f"CAST({float(value)!r} AS DOUBLE)"


def _quantised_finite(x: str, lo: float, hi: float, grid: float, bound: int) -> str:
    """``round(clamp(x) / grid)`` as an integer, for rows neither NULL nor NaN.

    Same value as ``round(clamp_sql(x, lo, hi) / grid)``: a row below lo contributes
    ``round(lo / grid)``, above hi ``round(hi / grid)`` (DuckDB folds both constants), in
    between ``round(x / grid)``; hence |value| <= ceil(max(|lo|, |hi|) / grid) = ``bound``.
    """
    t, lo_d, hi_d = _int_type(bound), _dbl(lo), _dbl(hi)
    return (f"(CASE WHEN {x} < {lo_d} THEN CAST(round({lo_d} / {grid!r}) AS {t}) "
            f"WHEN {x} > {hi_d} THEN CAST(round({hi_d} / {grid!r}) AS {t}) "
            f"ELSE CAST(round({x} / {grid!r}) AS {t}) END)")


#: Keeps the rows whose value is neither NULL nor NaN: in DuckDB NaN sorts above +inf and
#: equals itself, so ``x < NaN`` is false for NaN (and NULL) and true for every other value,
#: infinities included. One comparison with a constant: DuckDB pushes it into the scan.
NUMBER_ROWS = "x < CAST('nan' AS DOUBLE)"
#: Sums of integer-valued DOUBLEs are exact (in any order, in parallel) while every partial
#: sum stays below 2^53 in magnitude.
EXACT_DOUBLE_SUM = 2**53


def _power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


def _quantised_sum(plan: QueryPlan, x: str, lo: float, hi: float, grid: float,
                   bound: int) -> str:
    """``SUM(round(clamp(x) / grid))`` for rows neither NULL nor NaN: the exact integer.

    As :func:`_quantised_finite` (same per-row integers: DuckDB's ``round``, half away from
    zero, of the clamped value over the grid); when the plan bounds the rows it reads
    (``plan.max_rows``) so that ``bound * max_rows < 2^53``, each row's integer is kept as a
    DOUBLE (``x * (1 / grid)``: exact, the grid is a power of two) and summed as DOUBLE, which
    is then exact and cheaper than an integer cast per row; otherwise as integers.
    """
    if not _double_sums(plan, grid, bound):
        return f"SUM({_quantised_finite(x, lo, hi, grid, bound)})"
    lo_d, hi_d, inv = _dbl(lo), _dbl(hi), _dbl(1.0 / grid)
    return (f"SUM(CASE WHEN {x} < {lo_d} THEN round({lo_d} * {inv}) "
            f"WHEN {x} > {hi_d} THEN round({hi_d} * {inv}) ELSE round({x} * {inv}) END)")


def _rounded_sum(plan: QueryPlan, v: str, grid: float, bound: int) -> str:
    """``SUM(round(v / grid))`` of an already clamped ``v`` (|round| <= bound), as
    :func:`_q_sum`; summed as DOUBLE under the same condition as :func:`_quantised_sum`."""
    if not _double_sums(plan, grid, bound):
        return _q_sum(v, grid, bound)
    return f"SUM(round({v} * {_dbl(1.0 / grid)}))"


def _double_sums(plan: QueryPlan, grid: float, bound: int) -> bool:
    return (plan.max_rows is not None and bound * plan.max_rows < EXACT_DOUBLE_SUM
            and _power_of_two(grid))


def needs_row_stats(plan: QueryPlan) -> bool:
    """Whether the release reads the truncated row statistics (threshold or row aggregates)."""
    return not plan.public_keys or any(a.kind not in ("count_distinct", "quantile")
                                       for a in plan.aggregates)


def needs_row_count(plan: QueryPlan) -> bool:
    """Whether the release reads ``rows`` (COUNT(*) per group): threshold or a COUNT(*)."""
    return not plan.public_keys or any(a.kind == "count" and a.value_sql is None
                                       for a in plan.aggregates)


def row_stats_sql(plan: QueryPlan, min_rows: int | None = None,
                  limit: int | None = None) -> tuple[str, list[str]]:
    """SQL for the truncated integer statistics per group, and the statistic names.

    Statistics: ``rows`` (COUNT(*) of the truncated rows; only when the release reads it, see
    :func:`needs_row_count`), and per value aggregate ``i``: ``nvals{i}`` (rows whose clamped
    value is not NULL), ``sum{i}`` (sum of ``round(clamp(x) / grid)``) and ``sumsq{i}`` (sum of
    ``round(clamp(x)^2 / sq_grid)``), all exact integers of the truncated rows.

    Each aggregated expression is evaluated once per row in an inner query (``x{i}``). With
    public keys the ``key IN (declared values)`` filter is not applied here: each row still
    falls in exactly one group, the statistics of a declared group are computed from exactly
    the same rows, and groups outside the declared set are dropped before release (only
    declared keys are looked up), so no released statistic changes.

    One-pass form (every value aggregate has the same input expression and ``rows`` is not
    read, e.g. ``AVG(x) ... GROUP BY public key``): rows whose value is NULL or NaN are
    filtered out (:data:`NUMBER_ROWS`) before aggregating, and sums are quantised by
    :func:`_quantised_sum`. Such rows add
    nothing to COUNT(clamp(x)) nor to any sum of it (the clamped value is NULL), so on the
    remaining rows ``nvals = COUNT(*)`` and the sums are the same integers as in the general
    form: the statistics, their sensitivity (a person still has at most K truncated rows) and
    the released shape are unchanged. A group left with no row is read as 0, exactly as a
    group with only NULL values was (COUNT = 0, SUM = NULL read as 0). Whether this form is
    used depends on the plan only, never on the data.

    Thresholded plans (``min_rows``, ``limit``): only groups with at least ``min_rows``
    truncated rows are returned (``HAVING COUNT(*) >= min_rows``), at most ``limit`` of them;
    see :func:`threshold_floor` for why this keeps OpenDP's threshold analysis exact.
    """
    want_rows = needs_row_count(plan) or min_rows is not None
    stats = ["COUNT(*)"] if want_rows else []
    names = ["rows"] if want_rows else []
    vals = [(i, agg) for i, agg in enumerate(plan.aggregates)
            if agg.kind not in ("count_distinct", "quantile") and agg.value_sql is not None]
    gs = [f"g{i}" for i in range(len(plan.keys))]
    # Mixed keys (some declared, some thresholded) keep the filter: undeclared values of a
    # declared key never reach the threshold.
    where = _base_where(plan, True, public_filter=not plan.public_keys)
    if not vals:
        cols = ", ".join([*_key_cols(plan), *stats])
        sql = f"SELECT {cols} FROM {plan.join_sql} WHERE {where}{_group_by(plan)}"
        return sql + _bounded(min_rows, limit), names
    inputs = {agg.input_sql for _i, agg in vals}
    if not want_rows and len(inputs) == 1:
        (x_sql,) = inputs
        assert x_sql is not None
        for i, agg in vals:
            stats.append("COUNT(*)")
            names.append(f"nvals{i}")
            if agg.kind in ("sum", "avg", "variance", "stddev"):
                stats.append(_quantised_sum(plan, "x", agg.lower, agg.upper,
                                            mech.sum_grid(agg), mech.row_bound(agg)))
                names.append(f"sum{i}")
            if agg.kind in ("variance", "stddev"):
                v = _clamp_finite("x", agg.lower, agg.upper)
                stats.append(_rounded_sum(plan, f"{v} * {v}", mech.sq_grid(agg),
                                          mech.row_bound(agg, squared=True)))
                names.append(f"sumsq{i}")
        inner = ", ".join([*_key_cols(plan), f"{x_sql} AS x"])
        outer = ", ".join([*gs, *stats])
        sql = (f"SELECT {outer} FROM (SELECT {inner} FROM {plan.join_sql} WHERE {where}) "
               f"AS _spe_rows WHERE {NUMBER_ROWS}{_group_by(plan)}")
        return sql + _bounded(min_rows, limit), names
    inputs_sql: list[str] = []
    clamped: list[str] = []
    for i, agg in vals:
        assert agg.input_sql is not None
        inputs_sql.append(f"{agg.input_sql} AS x{i}")
        clamped.append(f"{clamp_sql(f'x{i}', agg.lower, agg.upper)} AS v{i}")
        stats.append(f"COUNT(v{i})")
        names.append(f"nvals{i}")
        if agg.kind in ("sum", "avg", "variance", "stddev"):
            stats.append(_q_sum(f"v{i}", mech.sum_grid(agg), mech.row_bound(agg)))
            names.append(f"sum{i}")
        if agg.kind in ("variance", "stddev"):
            stats.append(_q_sum(f"v{i} * v{i}", mech.sq_grid(agg),
                                mech.row_bound(agg, squared=True)))
            names.append(f"sumsq{i}")
    inner = ", ".join([*_key_cols(plan), *inputs_sql])
    middle = ", ".join([*gs, *clamped])
    outer = ", ".join([*gs, *stats])
    sql = (f"SELECT {outer} FROM (SELECT {middle} FROM (SELECT {inner} FROM {plan.join_sql} "
           f"WHERE {where}) AS _spe_in) AS _spe_rows{_group_by(plan)}")
    return sql + _bounded(min_rows, limit), names


def _bounded(min_rows: int | None, limit: int | None) -> str:
    out = f" HAVING COUNT(*) >= {int(min_rows)}" if min_rows is not None else ""
    return out + (f" LIMIT {int(limit)}" if limit is not None else "")


def threshold_floor(unit: Unit) -> int:
    """Fewest truncated rows a group needs to be fetched for the threshold: F = ceil(T / 4).

    Why OpenDP's analysis stays exact: the threshold measurement is run on the shifted counts
    ``c - (F - 1)`` of the groups with ``c >= F`` (a group with fewer rows is absent, i.e.
    shifted count 0), and ``F - 1`` is added back to each released count (post-processing).
    The map ``c -> max(c - (F - 1), 0)`` is 1-Lipschitz per group, so one person still changes
    at most k groups, by at most k each and by k in total: the measurement's input distance
    (k, k, k) and hence its (epsilon, delta) hold unchanged. A group is now released when
    ``c + noise > T + F - 1`` (a slightly higher effective threshold, shown in the accuracy),
    and the fetch returns at most (truncated rows) / F groups, never more than
    ``dp_max_threshold_groups`` (see :func:`execute`).
    """
    assert unit.threshold is not None
    return max(1, -(-unit.threshold // 4))


def _big_groups(plan: QueryPlan, min_rows: int) -> tuple[str, str]:
    """(ON condition, subquery) of the groups with at least ``min_rows`` truncated rows, to
    SEMI JOIN a thresholded plan's distinct or quantile rows on, so their fetch is bounded like
    the row statistics."""
    gs = [f"g{i}" for i in range(len(plan.keys))]
    on = " AND ".join(f"_spe_a.{g} IS NOT DISTINCT FROM _spe_b.{g}" for g in gs)
    big = (f"SELECT {', '.join(_key_cols(plan))} FROM {plan.join_sql} "
           f"WHERE {_base_where(plan, True)} GROUP BY {', '.join(gs)} "
           f"HAVING COUNT(*) >= {int(min_rows)}")
    return on, big


def _pid_sql(plan: QueryPlan) -> str:
    first = next(t for t in plan.tables if t.person_level)
    return first.unit_sql  # person_id, or a linked table's hidden person column


def distinct_sql(plan: QueryPlan, salt: int, min_rows: int | None = None) -> str:
    """Exact per-group distinct persons; each person kept in at most m groups.

    Stability: with no truncation needed (no keys, or public keys and m >= the number of
    cells) a person adds at most 1 to each of at most min(m, cells) groups. Otherwise each
    person's groups are reduced to at most m in SQL, by a salted hash chosen per query:
    ``arg_min(key, hash)`` over the person's rows keeps exactly one group (m = 1); for m > 1
    ``min_by(key, hash, m)`` over the person's distinct (key, person) pairs keeps at most m
    distinct groups. The grouping by person happens before any count, so however the person's
    rows are spread, the vector of per-group distinct counts changes by at most m in L1.

    Always computed on the truncated rows (every person-level table ``rank <= k``), like every
    other statistic: untruncated, the work grows with one person's row count (a join is a
    product of each person's rows: one person with 10,000 rows makes a 3-way self-join 10^12
    rows; a single table is read in full), so the answer time, or a time-out, would tell
    whether a person with many rows is in the data. Without WHERE the count is still exact
    (every person keeps the row ranked 1); with a selective WHERE a person whose matching rows
    are all ranked above k is not counted (the documented WHERE/truncation trade-off). The
    stability argument (at most 1 per group, at most m groups) holds for any subset of rows.

    ``min_rows`` (thresholded plans): only groups with at least that many truncated rows are
    returned (the only ones that can be released, see :func:`threshold_floor`), so the fetch
    is bounded. The filter applies *after* each person's m groups are chosen among all their
    groups: were the choice made among big groups only, one person making a group big could
    move many other persons' choices, and the counts of other groups would change. So every
    returned count is exactly the unfiltered one.
    """
    where = _base_where(plan, True)
    if not plan.keys:
        return f"SELECT COUNT(DISTINCT {_pid_sql(plan)}) FROM {plan.join_sql} WHERE {where}"
    keys = ", ".join(_key_cols(plan))
    gs = ", ".join(f"g{i}" for i in range(len(plan.keys)))
    m = plan.groups_per_person
    if plan.public_keys and m >= _cells(plan):  # nobody can exceed m groups: no truncation
        return (f"SELECT {keys}, COUNT(DISTINCT {_pid_sql(plan)}) FROM {plan.join_sql} "
                f"WHERE {where} GROUP BY {gs}")
    source = (f"SELECT {keys}, {_pid_sql(plan)} AS {PID} FROM {plan.join_sql} "
              f"WHERE {where}")
    if len(plan.keys) == 1:
        key, unpack = "g0", "_spe_k AS g0"
    else:
        key = "struct_pack(" + ", ".join(f"g{i} := g{i}" for i in range(len(plan.keys))) + ")"
        unpack = ", ".join(f"_spe_k.g{i} AS g{i}" for i in range(len(plan.keys)))
    h = f"hash({PID}, {gs}, {salt})"
    if m == 1:
        chosen = (f"SELECT arg_min({key}, {h}) AS _spe_k FROM ({source}) AS _spe_rows "
                  f"GROUP BY {PID}")
    else:
        chosen = (f"SELECT unnest(min_by({key}, {h}, {m})) AS _spe_k FROM (SELECT DISTINCT * "
                  f"FROM ({source}) AS _spe_rows) AS _spe_pairs GROUP BY {PID}")
    kept = f"SELECT {unpack} FROM ({chosen}) AS _spe_chosen"
    if min_rows is not None:
        on, big = _big_groups(plan, min_rows)
        kept = f"SELECT _spe_a.* FROM ({kept}) AS _spe_a SEMI JOIN ({big}) AS _spe_b ON {on}"
    return f"SELECT {gs}, COUNT(*) FROM ({kept}) AS _spe_kept GROUP BY {gs}"


def _cells(plan: QueryPlan) -> int:
    cells = 1
    for key in plan.keys:
        cells *= max(1, len(key.public_values or ()))
    return cells


def quantile_grid(agg: Aggregate) -> tuple[float, int]:
    """(first candidate, number of candidates) of the power-of-two candidate grid."""
    step = agg.grid
    lo = math.floor(agg.lower / step) * step
    hi = math.ceil(agg.upper / step) * step
    return lo, round((hi - lo) / step) + 1


def quantile_sql(plan: QueryPlan, agg: Aggregate, min_rows: int | None = None) -> str:
    """Per-group histogram of the clamped values over the candidate bins (truncated rows).

    Rows whose value is NULL or NaN are dropped (their clamped value is NULL, which the
    histogram never counted); every other row is clamped to [lower, upper] and put in exactly
    one bin, as before: one row still moves one bin count by 1.

    ``min_rows`` (thresholded plans): only the histograms of groups with at least that many
    truncated rows are returned (bounded fetch). A group's histogram is made of its own rows
    only, so every returned histogram is exactly the unfiltered one.
    """
    assert agg.input_sql is not None
    lo, n = quantile_grid(agg)
    v = _clamp_finite("x", agg.lower, agg.upper)
    bin_expr = (f"least(greatest(CAST(round(({v} - {lo!r}) / {agg.grid!r}) "
                f"AS BIGINT), 0), {n - 1})")
    gs = [f"g{i}" for i in range(len(plan.keys))]
    inner = ", ".join([*_key_cols(plan), f"{agg.input_sql} AS x"])
    cols = ", ".join([*gs, f"{bin_expr} AS b", "COUNT(*)"])
    rows = f"SELECT {inner} FROM {plan.join_sql} WHERE {_base_where(plan, True)}"
    if min_rows is not None:  # thresholded: only groups that can be released (bounded fetch)
        on, big = _big_groups(plan, min_rows)
        rows = f"SELECT _spe_a.* FROM ({rows}) AS _spe_a SEMI JOIN ({big}) AS _spe_b ON {on}"
    return (f"SELECT {cols} FROM ({rows}) AS _spe_rows WHERE x IS NOT NULL AND NOT "
            f"isnan(x) GROUP BY {', '.join([*gs, 'b'])}")


def _norm(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _keystr(key: tuple[Any, ...]) -> str:
    return json.dumps([_norm(v) for v in key], default=str)


class TooManyGroups(Exception):
    """A thresholded plan would fetch more than ``dp_max_threshold_groups`` groups."""


def execute(plan: QueryPlan, units: tuple[Unit, ...], con: duckdb.DuckDBPyConnection,
            settings: Settings, deadline: Deadline | None = None) -> Release:
    """Run ``plan`` and release its noisy table (see module docstring).

    Every statement runs with the time left before ``deadline`` (default: the query timeout
    from now) and every Python step after a fetch checks it: past it, QueryTimeout.
    Thresholded plans fetch at most ``dp_max_threshold_groups`` groups (:func:`threshold_floor`
    bounds them; past the bound, TooManyGroups): the caller turns either into its generic,
    charged failure.
    """
    mech.assert_safe_features()
    deadline = deadline or Deadline(settings.query_timeout_seconds)
    nk = len(plan.keys)
    by_role = {(u.role, u.agg): u for u in units}
    select_unit = by_role.get(("select", None))
    floor: int | None = None
    cap = settings.dp_max_threshold_groups
    if not plan.public_keys:
        assert select_unit is not None
        floor = threshold_floor(select_unit)
    sql, names = row_stats_sql(plan, floor, cap + 1 if floor is not None else None)
    stats: dict[str, dict[str, int]] = {}
    raw_keys: dict[str, tuple[Any, ...]] = {}
    fetched = run(con, sql, deadline.remaining()) if needs_row_stats(plan) else []
    if floor is not None and len(fetched) > cap:
        raise TooManyGroups
    for n_row, row in enumerate(fetched):
        if n_row % 4096 == 0:
            deadline.check()
        key = tuple(row[:nk])
        ks = _keystr(key)
        raw_keys[ks] = key
        stats[ks] = {n: int(v or 0) for n, v in zip(names, row[nk:], strict=True)}
    del fetched

    selected_counts: dict[str, int] = {}
    if plan.public_keys:
        key_list = [tuple(p) for p in itertools.product(
            *[k.public_values or () for k in plan.keys])]
        key_strs = [_keystr(k) for k in key_list]
    else:
        assert select_unit is not None and floor is not None
        shift = floor - 1  # see threshold_floor: OpenDP runs on the shifted counts
        shifted = mech.threshold_release({ks: s["rows"] - shift for ks, s in stats.items()},
                                         select_unit)
        selected_counts = {ks: v + shift for ks, v in shifted.items()}
        key_strs = sorted(selected_counts)
        key_list = [raw_keys[ks] for ks in key_strs]
    deadline.check()

    distinct: dict[str, int] = {}
    if any(a.kind == "count_distinct" for a in plan.aggregates) and (key_strs or not nk):
        for row in run(con, distinct_sql(plan, secrets.randbits(62), floor),
                       deadline.remaining()):
            distinct[_keystr(tuple(row[:nk]))] = int(row[nk] or 0)
    deadline.check()

    def stat(name: str) -> list[int]:
        return [stats.get(ks, {}).get(name, 0) for ks in key_strs]

    columns: dict[str, list[Any]] = {k.name: [_norm(v[i]) for v in key_list]
                                     for i, k in enumerate(plan.keys)}
    accuracy: dict[str, dict[str, Any]] = {}
    cell_ci: dict[str, list[tuple[float | None, float | None]]] = {}
    for i, agg in enumerate(plan.aggregates):
        vals, acc, cis = _release_aggregate(plan, i, agg, by_role, key_strs, stat, distinct,
                                            selected_counts, con, deadline, floor)
        columns[agg.name] = vals
        accuracy[agg.name] = acc
        cell_ci[agg.name] = cis
        deadline.check()
    table = pd.DataFrame({name: columns[name] for name in _all_columns(plan)})
    cells = []
    for r in range(len(table)):
        cells.append({name: {"mechanism": accuracy[name]["mechanism"],
                             "scale": accuracy[name]["scale"],
                             "ci95": list(cell_ci[name][r])}
                      for name in accuracy})
    deadline.check()
    table, cells = _post(plan, table, cells, settings, deadline)
    deadline.check()
    return Release(table=table, accuracy=accuracy, cells=cells)


def _all_columns(plan: QueryPlan) -> list[str]:
    seen = list(plan.columns)
    for k in plan.keys:
        if k.name not in seen:
            seen.insert(0, k.name)
    return seen


def _on_grid(value: float, grid: float) -> float:
    return round(value / grid) * grid


_Released = tuple[list[Any], dict[str, Any], list[tuple[Any, Any]]]


def _release_aggregate(plan: QueryPlan, i: int, agg: Aggregate,
                       by_role: dict[Any, Unit], key_strs: list[str],
                       stat: Any, distinct: dict[str, int], selected: dict[str, int],
                       con: duckdb.DuckDBPyConnection, deadline: Deadline,
                       floor: int | None) -> _Released:
    """The noisy values, accuracy and CIs of aggregate ``i``: one branch per kind (the
    ``match`` is exhaustive over :class:`~spe.dp.kinds.AggKind`; mypy rejects a missing one)."""
    match agg.kind:
        case AggKind.COUNT:
            if agg.value_sql is None:
                own = by_role.get(("count", i))
                if own is None:  # the first COUNT(*) of a thresholded query: threshold counts
                    unit = by_role[("select", None)]
                    vals, acc, cis = _with_ci([selected[ks] for ks in key_strs], unit,
                                              "laplace threshold")
                    if floor is not None:  # the effective threshold (see threshold_floor)
                        acc["threshold"] = int(unit.threshold or 0) + floor - 1
                    return vals, acc, cis
                return _with_ci(mech.laplace_release(stat("rows"), own), own,
                                "discrete laplace")
            unit = by_role[("nvals", i)]
            return _with_ci(mech.laplace_release(stat(f"nvals{i}"), unit), unit,
                            "discrete laplace")
        case AggKind.COUNT_DISTINCT:
            unit = by_role[("distinct", i)]
            vals = mech.laplace_release([distinct.get(ks, 0) for ks in key_strs], unit)
            return _with_ci(vals, unit, "discrete laplace")
        case AggKind.SUM:
            unit = by_role[("sum", i)]
            noisy = mech.laplace_release(stat(f"sum{i}"), unit)
            return _with_ci([v * agg.grid for v in noisy], unit, "discrete laplace (gridded)")
        case AggKind.AVG:
            return _release_mean(i, agg, by_role, stat)
        case AggKind.VARIANCE | AggKind.STDDEV:
            return _release_spread(i, agg, by_role, stat)
        case AggKind.QUANTILE:
            return _release_quantile(plan, i, agg, by_role, key_strs, con, deadline, floor)
        case _:
            assert_never(agg.kind)


def _release_mean(i: int, agg: Aggregate, by_role: dict[Any, Unit], stat: Any) -> _Released:
    su, cu = by_role[("sum", i)], by_role[("nvals", i)]
    s = [v * su.grid for v in mech.laplace_release(stat(f"sum{i}"), su)]
    c = mech.laplace_release(stat(f"nvals{i}"), cu)
    out: list[Any] = []
    cis: list[tuple[Any, Any]] = []
    hw_s, hw_c = mech.ci95_halfwidth(su), mech.ci95_halfwidth(cu)
    for sv, cv in zip(s, c, strict=True):
        if cv <= 0:
            out.append(None)
            cis.append((agg.lower, agg.upper))
            continue
        mean = min(max(sv / cv, agg.lower), agg.upper)
        out.append(_on_grid(mean, agg.grid))
        hw = (hw_s + abs(mean) * hw_c) / max(cv - hw_c, 1.0)
        cis.append((max(mean - hw, agg.lower), min(mean + hw, agg.upper)))
    acc: dict[str, Any] = {"mechanism": "discrete laplace on sum and count (ratio)",
                           "scale": {"sum": su.scale * su.grid, "count": cu.scale},
                           "ci95_kind": "approximate"}
    return out, acc, cis


def _release_spread(i: int, agg: Aggregate, by_role: dict[Any, Unit], stat: Any
                    ) -> _Released:
    su, cu = by_role[("sum", i)], by_role[("nvals", i)]
    s = [v * su.grid for v in mech.laplace_release(stat(f"sum{i}"), su)]
    c = mech.laplace_release(stat(f"nvals{i}"), cu)
    out: list[Any] = []
    cis: list[tuple[Any, Any]] = []
    qu = by_role[("sumsq", i)]
    s2 = [v * qu.grid for v in mech.laplace_release(stat(f"sumsq{i}"), qu)]
    vmax = ((agg.upper - agg.lower) / 2.0) ** 2
    for sv, s2v, cv in zip(s, s2, c, strict=True):
        denom = cv if agg.population else cv - 1
        if cv <= 1 or denom <= 0:
            out.append(None)
            cis.append((None, None))
            continue
        var = (s2v - sv * sv / cv) / denom
        var = min(max(var, 0.0), vmax)
        value = math.sqrt(var) if agg.kind is AggKind.STDDEV else var
        out.append(_on_grid(value, agg.grid))
        cis.append((None, None))
    acc = {"mechanism": "discrete laplace on count, sum and sum of squares",
           "scale": {"sum": su.scale * su.grid, "sumsq": qu.scale * qu.grid,
                     "count": cu.scale}, "ci95_kind": "not available"}
    return out, acc, cis


def _release_quantile(plan: QueryPlan, i: int, agg: Aggregate, by_role: dict[Any, Unit],
                      key_strs: list[str], con: duckdb.DuckDBPyConnection,
                      deadline: Deadline, floor: int | None) -> _Released:
    """One report-noisy-max per group over the candidate grid."""
    n = len(key_strs)
    unit = by_role[("quantile", i)]
    lo, ncand = quantile_grid(agg)
    hists: dict[str, list[int]] = {ks: [0] * ncand for ks in key_strs}
    nk = len(plan.keys)
    rows = run(con, quantile_sql(plan, agg, floor), deadline.remaining()) if key_strs else []
    for n_row, row in enumerate(rows):
        if n_row % 4096 == 0:
            deadline.check()
        ks = _keystr(tuple(row[:nk]))
        if ks in hists:
            hists[ks][int(row[nk])] += int(row[nk + 1])
    out = []
    a = mech.alpha_num(agg)
    for ks in key_strs:
        deadline.check()
        j = mech.noisy_argmin(mech.quantile_scores(hists[ks], a), unit)
        out.append(lo + j * agg.grid)
    acc = {
           "mechanism": "report noisy max (gumbel) on quantile scores", "scale": unit.scale,
           "candidates": ncand, "grid": agg.grid, "ci95_kind": "not available"}
    return out, acc, [(None, None)] * n


def _with_ci(vals: list[Any], unit: Unit, mechanism: str
             ) -> tuple[list[Any], dict[str, Any], list[tuple[Any, Any]]]:
    hw = mech.ci95_halfwidth(unit)
    acc = {"mechanism": mechanism, "scale": unit.scale * unit.grid, "ci95_halfwidth": hw}
    if unit.threshold is not None:
        acc["threshold"] = unit.threshold
    return vals, acc, [(v - hw, v + hw) for v in vals]


def _post(plan: QueryPlan, table: pd.DataFrame, cells: list[dict[str, Any]],
          settings: Settings, deadline: Deadline) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Apply HAVING / ORDER BY / LIMIT to the noisy table (post-processing only)."""
    post = plan.post
    if not (post.having_sql or post.order_sql or post.limit is not None):
        return table, cells
    work = table.copy()
    work["_spe_row"] = range(len(work))
    con = connect_memory(settings)
    try:
        con.register("noisy", work)
        sql = "SELECT * FROM noisy"
        if post.having_sql:
            sql += f" WHERE {post.having_sql}"
        if post.order_sql:
            sql += f" ORDER BY {post.order_sql}"
        if post.limit is not None:
            sql += f" LIMIT {post.limit}"
        out = run_df(con, sql, deadline.remaining())
    finally:
        con.close()
    order = [int(r) for r in out["_spe_row"]]
    out = out.drop(columns=["_spe_row"]).reset_index(drop=True)
    return out, [cells[r] for r in order]
