"""Known attacks on DP SQL engines; each test compares neighbouring datasets where it can.

Neighbouring datasets differ by one person (id 123) with a maximal contribution: 10,000 rows
in a table. The engine's exact (pre-noise) statistics are compared between them: the
difference must stay within the sensitivity the plan declares and pays for.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pytest

from spe.config import Settings
from spe.dp import duck
from spe.dp import mechanisms as mech
from spe.dp.engine import execute, row_stats_sql
from spe.dp.runner import prepare, release
from spe.dp.testing import make_dataset, make_terms
from spe.errors import QueryRefused

HEAVY = 123
HEAVY_ROWS = 10_000
# Person 123 gets 10,000 extra measurement rows (with hostile values) and 50 conditions.
EXTRA = f"""
INSERT INTO _measurement SELECT 10000000 + i, 10000000 + i, {HEAVY}, 3004249,
  DATE '2015-06-01', CASE i % 4 WHEN 0 THEN 1e300 WHEN 1 THEN 'inf'::DOUBLE
  WHEN 2 THEN 'nan'::DOUBLE ELSE NULL END FROM range({HEAVY_ROWS}) t(i);
INSERT INTO _condition_occurrence SELECT 20000000 + i, 20000000 + i, {HEAVY}, 999999,
  DATE '2015-06-01' FROM range(50) t(i);
"""
REMOVE = f"""
DELETE FROM _measurement WHERE person_id = {HEAVY};
DELETE FROM _condition_occurrence WHERE person_id = {HEAVY};
DELETE FROM _drug_exposure WHERE person_id = {HEAVY};
DELETE FROM _person WHERE person_id = {HEAVY};
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = Path(tmp_path_factory.mktemp("nb"))
    with_p = make_dataset(base / "with.duckdb", persons=400, extra_sql=EXTRA)
    make_dataset(base / "without.duckdb", persons=400, extra_sql=REMOVE)
    settings = Settings(data_dir=base / "var")
    return with_p, base / "with.duckdb", base / "without.duckdb", settings


def _exact(sql: str, pair, **kw) -> tuple[list[dict], list[dict], object]:  # type: ignore[no-untyped-def]
    meta, with_path, without_path, _ = pair
    prepared = prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6, **kw)
    stats_sql, names = row_stats_sql(prepared.plan)
    out = []
    for path in (with_path, without_path):
        con = duckdb.connect(str(path), read_only=True)
        rows = sorted(con.execute(stats_sql).fetchall(), key=str)
        out.append([dict(zip(names, r, strict=True)) for r in rows])
        con.close()
    return out[0], out[1], prepared


def test_truncation_bounds_a_person_with_10000_rows(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, prepared = _exact("SELECT COUNT(*) FROM measurement", pair)
    k = prepared.plan.rows_per_person
    assert k == 5
    assert 0 <= a[0]["rows"] - b[0]["rows"] <= k  # not 10,000
    unit = prepared.cost.units[0]
    assert unit.d_in == k and unit.scale >= k / 1.0


def test_derived_table_reads_a_bounded_number_of_rows_per_person(pair) -> None:  # type: ignore[no-untyped-def]
    """A per-person derived table counts 1 row per person in K, and its aggregation reads at
    most DERIVED_ROWS_PER_PERSON of a person's rows: the heavy person's COUNT(*) is capped
    (the work, and so the answer time, cannot grow with one person's 10,000 rows)."""
    from spe.dp.derived import DERIVED_ROWS_PER_PERSON

    sql = ("SELECT COUNT(*), SUM(f.n) FROM (SELECT person_id, COUNT(*) AS n, "
           "MIN(measurement_date) AS first FROM measurement GROUP BY person_id) f")
    a, b, prepared = _exact(sql, pair)
    assert prepared.plan.rows_per_person == 1
    assert a[0]["rows"] - b[0]["rows"] == 1  # the heavy person is one derived row
    _meta, with_path, _without, _ = pair
    con = duckdb.connect(str(with_path), read_only=True)
    source = next(t.source_sql for t in prepared.plan.tables if t.source_sql)
    heavy = con.execute(f"SELECT n FROM ({source}) WHERE person_id = {HEAVY}").fetchone()
    total = con.execute(f"SELECT COUNT(*) FROM measurement WHERE person_id = {HEAVY}").fetchone()
    con.close()
    assert heavy is not None and total is not None
    assert total[0] > HEAVY_ROWS and heavy[0] == DERIVED_ROWS_PER_PERSON
    sum_unit = next(u for u in prepared.cost.units if u.role == "sum")
    assert sum_unit.d_in >= DERIVED_ROWS_PER_PERSON / (sum_unit.grid or 1) * 0.99


@pytest.mark.parametrize("sql", [
    "SELECT COUNT(*) FROM measurement m JOIN condition_occurrence c "
    "ON m.person_id = c.person_id",
    "SELECT COUNT(*), SUM(m.value_as_number) FROM condition_occurrence c JOIN measurement m "
    "ON m.person_id = c.person_id WHERE m.measurement_concept_id = 3004249",
    "SELECT COUNT(DISTINCT a.person_id) FROM measurement a JOIN measurement b "
    "ON a.person_id = b.person_id JOIN condition_occurrence c ON c.person_id = a.person_id",
])
def test_deferred_rank_filter_keeps_exactly_the_truncated_rows(pair, sql: str) -> None:  # type: ignore[no-untyped-def]
    """With two or more truncated tables one rank filter is written so DuckDB applies it in
    the join (see plan._truncation_sql): the statistics, the heavy person's included, are the
    same as with every filter pushed into its scan, and DuckDB really keeps it out of the
    scan (so it estimates that table as the raw query does)."""
    import re
    from dataclasses import replace

    from spe.dp.engine import distinct_sql

    meta, with_path, _without, _ = pair
    plan = prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6).plan
    deferred = re.findall(r'\((t\d+)\."_spe_row_rank" \+ 0 \* t\d+\."_spe_row_rank"\)',
                          plan.truncation_sql)
    assert len(deferred) == 1
    plain = replace(plan, truncation_sql=re.sub(
        r'\((t\d+\."_spe_row_rank") \+ 0 \* t\d+\."_spe_row_rank"\)', r"\1",
        plan.truncation_sql))
    assert plain.truncation_sql != plan.truncation_sql
    con = duckdb.connect(str(with_path), read_only=True)
    try:
        if "DISTINCT" in sql:
            stats = [sorted(con.execute(distinct_sql(p, 7)).fetchall(), key=str)
                     for p in (plan, plain)]
            query = distinct_sql(plan, 7)
        else:
            stats = [sorted(con.execute(row_stats_sql(p)[0]).fetchall(), key=str)
                     for p in (plan, plain)]
            query = row_stats_sql(plan)[0]
        assert stats[0] == stats[1] and stats[0]
        shown = con.execute("EXPLAIN " + query).fetchall()[0][1]
        truncated = sum(1 for t in plan.tables if t.person_level and not t.one_per_person)
        # every rank filter but the deferred one is pushed into its table's scan
        assert shown.count("_spe_row_rank <= ") == truncated - 1, shown
    finally:
        con.close()


def test_rank_filters_stay_pushed_down_where_the_where_filters_every_table(pair) -> None:  # type: ignore[no-untyped-def]
    meta = pair[0]
    for sql in ("SELECT COUNT(*) FROM measurement",
                "SELECT COUNT(*) FROM measurement m JOIN condition_occurrence c "
                "ON m.person_id = c.person_id WHERE m.value_as_number > 1 "
                "AND c.condition_start_date > DATE '2015-01-01'"):
        plan = prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6).plan
        assert "+ 0 *" not in plan.truncation_sql and "_spe_row_rank" in plan.truncation_sql


def test_self_join_does_not_multiply_weight(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, prepared = _exact(
        "SELECT COUNT(*) FROM measurement x JOIN measurement y ON x.person_id = y.person_id",
        pair)
    k = prepared.plan.rows_per_person
    assert k == 25  # 5 x 5, paid for in the noise scale
    assert 0 <= a[0]["rows"] - b[0]["rows"] <= k
    assert prepared.cost.units[0].d_in == k


def test_join_with_other_table_bounded(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, prepared = _exact(
        "SELECT COUNT(*) FROM measurement m JOIN condition_occurrence c "
        "ON m.person_id = c.person_id", pair)
    assert 0 <= a[0]["rows"] - b[0]["rows"] <= prepared.plan.rows_per_person == 15


def test_join_on_the_person_and_another_column_is_planned_and_bounded(pair) -> None:  # type: ignore[no-untyped-def]
    """ON a.person_id = b.person_id AND a.x = b.y (two conditions) was a crash in planning."""
    a, b, prepared = _exact(
        "SELECT COUNT(*) FROM measurement m JOIN condition_occurrence c "
        "ON m.person_id = c.person_id AND m.measurement_date = c.condition_start_date", pair)
    assert 'm."measurement_date"' not in prepared.plan.join_sql  # re-rendered, not copied
    assert '"measurement_date" = ' in prepared.plan.join_sql
    assert 0 <= a[0]["rows"] - b[0]["rows"] <= prepared.plan.rows_per_person == 15


def test_sum_case_person_literal_is_clamped(pair) -> None:  # type: ignore[no-untyped-def]
    sql = f"SELECT SUM(CASE WHEN person_id = {HEAVY} THEN 1e6 ELSE 0 END) AS s FROM measurement"
    a, b, prepared = _exact(sql, pair)
    agg = prepared.plan.aggregates[0]
    assert (agg.lower, agg.upper) == (0.0, 1e6)
    per_row = mech.row_bound(agg)
    k = prepared.plan.rows_per_person
    # Quantised sums differ by at most k rows at the bound; the noise pays for exactly that.
    assert abs(a[0]["sum0"] - b[0]["sum0"]) <= k * per_row
    unit = next(u for u in prepared.cost.units if u.role == "sum")
    assert unit.d_in == k * per_row


def test_hostile_values_clamped_nan_null_inf(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, prepared = _exact("SELECT SUM(value_as_number) AS s FROM measurement", pair)
    agg = prepared.plan.aggregates[0]
    assert agg.upper == 500.0
    k = prepared.plan.rows_per_person
    assert abs(a[0]["sum0"] - b[0]["sum0"]) <= k * mech.row_bound(agg)


def test_no_data_dependent_shape_or_error(pair) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, without_path, settings = pair
    sql = ("SELECT measurement_concept_id, SUM(value_as_number), "
           "AVG(LEAST(GREATEST(value_as_number / 0, 0), 10)), "
           "STDDEV(LEAST(GREATEST(value_as_number * 1e300, -100), 100)), "
           "MEDIAN(value_as_number), COUNT(DISTINCT person_id) FROM measurement GROUP BY 1")
    prepared = prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6)
    shapes = []
    for path in (with_path, without_path):
        rel = release(prepared, path, settings)
        shapes.append((rel.table.shape, list(rel.table.columns),
                       list(rel.table["measurement_concept_id"])))
    assert shapes[0] == shapes[1]


def test_min_max_refused_with_quantile_alternative(pair) -> None:  # type: ignore[no-untyped-def]
    meta = pair[0]
    for fn in ("MIN", "MAX"):
        with pytest.raises(QueryRefused, match="QUANTILE"):
            prepare(f"SELECT {fn}(value_as_number) FROM measurement", meta, make_terms(meta),
                    epsilon=1.0, delta=1e-6)


def test_released_floats_lie_on_the_grid(pair) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _, settings = pair
    sql = ("SELECT measurement_concept_id, SUM(value_as_number) AS s, AVG(value_as_number) AS a,"
           " MEDIAN(value_as_number) AS q FROM measurement GROUP BY 1")
    prepared = prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6)
    rel = release(prepared, with_path, settings)
    for agg in prepared.plan.aggregates:
        k = math.log2(agg.grid)
        assert k == int(k)
        for value in rel.table[agg.name]:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            assert (value / agg.grid).is_integer(), (agg.name, value, agg.grid)


def test_rare_group_key_released_no_more_than_delta(pair) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _, settings = pair
    delta = 0.01
    prepared = prepare("SELECT condition_concept_id, COUNT(*) FROM condition_occurrence "
                       "GROUP BY 1", meta, make_terms(meta), epsilon=1.0, delta=delta)
    assert prepared.cost.delta <= delta
    con = duck.connect(with_path, settings)
    releases, seen = 1000, 0
    try:
        for _ in range(releases):
            rel = execute(prepared.plan, prepared.cost.units, con, settings)
            seen += int((rel.table["condition_concept_id"] == 999999).sum())
    finally:
        con.close()
    # The rare key (one person, truncated to k=3 rows) may appear with probability <= delta.
    # Binomial(1000, 0.01): P(X > 25) < 1e-4.
    assert seen <= 25, seen


def test_isolating_where_repeated_until_refused(pair, sqlite_db) -> None:  # type: ignore[no-untyped-def]
    from spe.budget import ledger
    from spe.dp.service import Caller, QueryRequest, run_query
    from spe.errors import BudgetExceeded

    meta, with_path, _, settings = pair
    terms = make_terms(meta, epsilon=2.0, max_epsilon_per_query=1.0)
    caller = Caller(actor="alice")
    req = QueryRequest(sql=f"SELECT COUNT(*) FROM measurement WHERE person_id = {HEAVY}",
                       epsilon=0.3)
    answered = 0
    with pytest.raises(BudgetExceeded):
        for _ in range(100):
            run_query(sqlite_db, settings, terms, caller, req, lambda _n: (meta, with_path))
            answered += 1
    assert answered == 6  # 6 x 0.3 <= 2.0 < 7 x 0.3
    with sqlite_db.read() as session:
        snap = ledger.snapshot(session, terms)
        assert snap.epsilon_spent <= terms.budget.epsilon
        assert ledger.check_ledger(session, terms.permit_id)
