"""The generated statistics SQL against naive reference queries on a small dataset."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest

from spe.config import Settings
from spe.datasets.metadata import DatasetMetadata
from spe.dp import duck
from spe.dp.engine import NUMBER_ROWS, distinct_sql, needs_row_stats, row_stats_sql
from spe.dp.runner import prepare
from spe.dp.testing import make_dataset, make_terms


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[DatasetMetadata, duckdb.DuckDBPyConnection]]:
    path = tmp_path_factory.mktemp("sql") / "d.duckdb"
    meta = make_dataset(path, persons=120, rows_per_person=6)
    con = duck.connect(path, Settings(data_dir=path.parent / "var", duckdb_threads=1))
    yield meta, con
    con.close()


def _plan(meta: DatasetMetadata, sql: str, **kw: int):  # type: ignore[no-untyped-def]
    terms = make_terms(meta)
    return prepare(sql, meta, terms, epsilon=1.0, delta=1e-6, **kw).plan


@pytest.mark.parametrize("m", [1, 2, 3, 40])
@pytest.mark.parametrize("keys", ["year(measurement_date)",
                                  "year(measurement_date), measurement_concept_id"])
def test_distinct_keeps_at_most_m_groups_per_person(data, m: int, keys: str) -> None:  # type: ignore[no-untyped-def]
    meta, con = data
    plan = _plan(meta, f"SELECT {keys}, COUNT(DISTINCT person_id) FROM measurement "
                 f"GROUP BY {keys}", max_groups_per_person=m)
    nk = len(plan.keys)
    got = {tuple(r[:nk]): r[nk] for r in con.execute(distinct_sql(plan, 12345)).fetchall()}
    key_sql = ", ".join(k.sql.replace("t0.", "") for k in plan.keys)
    # Distinct persons are counted on the truncated rows, like every other statistic.
    rows = (f"measurement WHERE year(measurement_date) BETWEEN 2010 AND 2024 "
            f"AND _spe_row_rank <= {plan.tables[0].k}")
    exact = {tuple(r[:nk]): r[nk] for r in con.execute(
        f"SELECT {key_sql}, COUNT(DISTINCT person_id) FROM {rows} GROUP BY ALL").fetchall()}
    kept = con.execute(
        f"SELECT SUM(least(n, {m})) FROM (SELECT person_id, COUNT(DISTINCT ({key_sql})) AS n "
        f"FROM {rows} GROUP BY person_id)").fetchone()[0]
    assert sum(got.values()) == kept  # each person in exactly min(m, their groups) groups
    for key, n in got.items():
        assert 0 < n <= exact[key]
    if m >= 40:
        assert got == exact


def test_row_stats_match_a_naive_reference(data) -> None:  # type: ignore[no-untyped-def]
    meta, con = data
    plan = _plan(meta, "SELECT measurement_concept_id, COUNT(*), SUM(value_as_number), "
                 "VARIANCE(value_as_number) FROM measurement GROUP BY 1")
    sql, names = row_stats_sql(plan)
    got = {r[0]: dict(zip(names, r[1:], strict=True)) for r in con.execute(sql).fetchall()}
    agg = plan.aggregates[1]
    ref = con.execute(
        f"SELECT measurement_concept_id, COUNT(*), COUNT({agg.value_sql.replace('t0.', '')}), "
        f"SUM(CAST(round(({agg.value_sql.replace('t0.', '')}) / {agg.grid!r}) AS BIGINT)) "
        f"FROM measurement WHERE _spe_row_rank <= 5 GROUP BY 1").fetchall()
    assert ref
    for concept, rows, nvals, qsum in ref:
        assert got[concept]["rows"] == rows
        assert got[concept]["nvals1"] == nvals
        assert got[concept]["sum1"] == qsum
    assert "sumsq2" in names


def test_person_table_unique_on_person_id_is_not_truncated(data) -> None:  # type: ignore[no-untyped-def]
    meta, _con = data
    assert meta.tables["person"].unique_key == ["person_id"]
    plan = _plan(meta, "SELECT gender_concept_id, COUNT(*) FROM person GROUP BY 1",
                 max_rows_per_person=7)
    assert plan.rows_per_person == 1 and "_spe_row_rank" not in row_stats_sql(plan)[0]
    joined = _plan(meta, "SELECT COUNT(*) FROM person p JOIN measurement m "
                   "ON p.person_id = m.person_id")
    assert joined.rows_per_person == meta.tables["measurement"].max_rows_per_person
    assert not needs_row_stats(_plan(meta, "SELECT year(measurement_date), "
                                     "COUNT(DISTINCT person_id) FROM measurement GROUP BY 1"))


def test_undeclared_unique_person_table_keeps_its_rank_filter(tmp_path: Path) -> None:
    dup = "INSERT INTO _person VALUES (1, 999999, 8507, 1950);"
    meta = make_dataset(tmp_path / "d.duckdb", persons=20, extra_sql=dup)
    assert meta.tables["person"].unique_key == []
    plan = _plan(meta, "SELECT COUNT(*) FROM person", max_rows_per_person=2)
    assert plan.rows_per_person == 2 and "_spe_row_rank" in row_stats_sql(plan)[0]


HOSTILE = ("INSERT INTO _measurement SELECT 900000 + i, 900000 + i, 1 + i % 7, 3004249, "
           "DATE '2015-01-01', v FROM (SELECT i, unnest(['NaN'::DOUBLE, 'inf'::DOUBLE, "
           "'-inf'::DOUBLE, NULL, 1e300, -1e300, -3.5, 499.875, 0.125]) AS v "
           "FROM range(3) t(i));")


@pytest.mark.parametrize("sql", [
    "SELECT measurement_concept_id, AVG(value_as_number) FROM measurement GROUP BY 1",
    "SELECT SUM(value_as_number), COUNT(value_as_number), STDDEV(value_as_number) "
    "FROM measurement",
    "SELECT measurement_concept_id, VARIANCE(value_as_number / 2) FROM measurement "
    "GROUP BY 1",
])
@pytest.mark.parametrize("double_sums", [True, False])
def test_one_pass_stats_equal_the_clamped_reference(tmp_path: Path, sql: str,
                                                     double_sums: bool) -> None:
    """The one-pass form (NULL/NaN rows filtered, clamp by comparisons) gives the same
    integers as the reference: COUNT and quantised sums of clamp_sql over truncated rows,
    whether the quantised values are summed as DOUBLE (rows bounded by the plan) or as
    integers (no bound)."""
    meta = make_dataset(tmp_path / "d.duckdb", persons=60, extra_sql=HOSTILE)
    plan = _plan(meta, sql, max_rows_per_person=50)  # every hostile row is kept
    assert plan.max_rows == 50 * meta.tables["measurement"].row_count
    if not double_sums:
        plan = replace(plan, max_rows=None)
    stats_sql, names = row_stats_sql(plan)
    assert "rows" not in names and NUMBER_ROWS in stats_sql  # the one-pass form is used
    assert ("CAST(round(" not in stats_sql.split(" FROM ")[0]) == double_sums
    con = duckdb.connect(str(tmp_path / "d.duckdb"), read_only=True)
    nk = len(plan.keys)
    got = {tuple(r[:nk]): dict(zip(names, r[nk:], strict=True))
           for r in con.execute(stats_sql).fetchall()}
    from spe.dp import mechanisms as mech
    keys = ", ".join(f"{k.sql} AS g{i}" for i, k in enumerate(plan.keys))
    for i, agg in enumerate(plan.aggregates):
        v = agg.value_sql
        cols = [f"COUNT({v})", f"SUM(CAST(round(({v}) / {mech.sum_grid(agg)!r}) AS BIGINT))",
                f"SUM(CAST(round(({v}) * ({v}) / {mech.sq_grid(agg)!r}) AS BIGINT))"]
        ref_sql = (f"SELECT {', '.join([keys, *cols]) if keys else ', '.join(cols)} FROM "
                   f"{plan.join_sql} WHERE {plan.truncation_sql}"
                   + (" GROUP BY ALL" if keys else ""))
        ref = con.execute(ref_sql).fetchall()
        assert ref
        for r in ref:
            stat = got.get(tuple(r[:nk]), {})
            assert stat.get(f"nvals{i}", 0) == r[nk]
            if f"sum{i}" in names:
                assert (stat.get(f"sum{i}") or 0) == (r[nk + 1] or 0)
            if f"sumsq{i}" in names:
                assert (stat.get(f"sumsq{i}") or 0) == (r[nk + 2] or 0)
    con.close()


def test_quantile_histogram_equals_the_clamped_reference(tmp_path: Path) -> None:
    from spe.dp.engine import quantile_grid, quantile_sql
    meta = make_dataset(tmp_path / "d.duckdb", persons=60, extra_sql=HOSTILE)
    plan = _plan(meta, "SELECT measurement_concept_id, MEDIAN(value_as_number) "
                 "FROM measurement GROUP BY 1", max_rows_per_person=50)
    agg = plan.aggregates[0]
    lo, n = quantile_grid(agg)
    con = duckdb.connect(str(tmp_path / "d.duckdb"), read_only=True)
    got = sorted(con.execute(quantile_sql(plan, agg)).fetchall())
    v = agg.value_sql
    ref = sorted(con.execute(
        f"SELECT {plan.keys[0].sql} AS g0, least(greatest(CAST(round((({v}) - {lo!r}) / "
        f"{agg.grid!r}) AS BIGINT), 0), {n - 1}) AS b, COUNT(*) FROM {plan.join_sql} "
        f"WHERE {plan.truncation_sql} AND ({v}) IS NOT NULL "
        f"AND {plan.keys[0].sql} IN (3004249, 3012888, 3027018, 3020891, 3025315) "
        f"GROUP BY ALL").fetchall())
    con.close()
    assert got == ref and any(b == n - 1 for _g, b, _c in got)
