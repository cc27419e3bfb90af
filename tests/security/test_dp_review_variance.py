"""VARIANCE must estimate the variance: its plain sum is quantised on the grid of B, not B^2.

VARIANCE's released values lie on the grid of B^2 (B bounds |value|); quantising the plain
sum on that grid rounded every value in [0, 500] to a multiple of 128, so s^2 / n was far off
and the estimate was clamped to 0 however much epsilon was spent. Tiny bounds made the plain
sum's per-row bound B / g(B^2) overflow i64 (an unhandled error instead of an answer).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from spe.config import Settings
from spe.dp import mechanisms as mech
from spe.dp.runner import prepare, release
from spe.dp.testing import make_dataset, make_terms


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = Path(tmp_path_factory.mktemp("var"))
    meta = make_dataset(base / "d.duckdb", persons=1000)
    con = duckdb.connect(str(base / "d.duckdb"), read_only=True)
    row = con.execute("SELECT var_samp(value_as_number), var_pop(value_as_number) "
                      "FROM measurement WHERE _spe_row_rank <= 5").fetchone()
    con.close()
    assert row is not None
    return meta, base / "d.duckdb", Settings(data_dir=base / "v"), row


def test_variance_estimates_the_variance(dataset) -> None:  # type: ignore[no-untyped-def]
    meta, path, settings, (var_samp, var_pop) = dataset
    terms = make_terms(meta, epsilon=1e6, max_epsilon_per_query=1e5)
    prepared = prepare("SELECT VARIANCE(value_as_number) AS v, VAR_POP(value_as_number) AS p "
                       "FROM measurement", meta, terms, epsilon=1e5, delta=0.0)
    rel = release(prepared, path, settings)
    grid = prepared.plan.aggregates[0].grid  # released values are rounded to this grid
    assert abs(rel.table["v"][0] - var_samp) <= grid / 2 + 0.02 * var_samp, (rel.table, var_samp)
    assert abs(rel.table["p"][0] - var_pop) <= grid / 2 + 0.02 * var_pop, (rel.table, var_pop)
    for agg in prepared.plan.aggregates:  # released values stay on the variance grid
        assert (rel.table[agg.name][0] / agg.grid).is_integer()


def test_variance_of_tiny_values_is_priced(dataset) -> None:  # type: ignore[no-untyped-def]
    meta = dataset[0]
    prepared = prepare("SELECT VARIANCE(value_as_number * 1e-100) FROM measurement", meta,
                       make_terms(meta), epsilon=1.0, delta=0.0)
    agg = prepared.plan.aggregates[0]
    assert mech.row_bound(agg) <= 2048
