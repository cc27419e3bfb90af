"""The generated statistics SQL against naive reference queries on a small dataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from spe.config import Settings
from spe.datasets.metadata import DatasetMetadata
from spe.dp import duck
from spe.dp.engine import distinct_sql, needs_row_stats, row_stats_sql
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
    exact = {tuple(r[:nk]): r[nk] for r in con.execute(
        f"SELECT {key_sql}, COUNT(DISTINCT person_id) FROM measurement "
        f"WHERE year(measurement_date) BETWEEN 2010 AND 2024 GROUP BY ALL").fetchall()}
    kept = con.execute(
        f"SELECT SUM(least(n, {m})) FROM (SELECT person_id, COUNT(DISTINCT ({key_sql})) AS n "
        f"FROM measurement WHERE year(measurement_date) BETWEEN 2010 AND 2024 "
        f"GROUP BY person_id)").fetchone()[0]
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
