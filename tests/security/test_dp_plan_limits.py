"""Bounded work: plans whose cells, quantile candidates or names could make the engine work
(or print) without bound are refused at planning, quickly, from metadata alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spe.datasets.metadata import DatasetMetadata
from spe.dp.plan import MAX_PLAN_WORK
from spe.dp.runner import prepare
from spe.dp.testing import make_dataset, make_terms
from spe.errors import QueryRefused


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> DatasetMetadata:
    return make_dataset(Path(tmp_path_factory.mktemp("limits")) / "d.duckdb", persons=50)


def _prepare(meta: DatasetMetadata, sql: str) -> object:
    return prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6)


def test_huge_public_key_grid_is_refused_quickly(meta: DatasetMetadata) -> None:
    sql = ("SELECT dayofyear(measurement_date), day(measurement_date), "
           "month(measurement_date), measurement_concept_id, COUNT(*) FROM measurement "
           "GROUP BY 1, 2, 3, 4")  # 366 x 31 x 12 x 5 cells
    start = time.monotonic()
    with pytest.raises(QueryRefused) as info:
        _prepare(meta, sql)
    assert time.monotonic() - start < 2
    assert "cells" in str(info.value)


def test_cells_times_quantile_candidates_are_bounded(meta: DatasetMetadata) -> None:
    # 15 years x 12 months = 180 cells: fine for a count, not for 20 quantiles of ~2,000
    # candidates each (180 x 20 x ~2,049 > the bound).
    quantiles = ", ".join(f"QUANTILE_CONT(value_as_number, {q / 100}) AS q{q}"
                          for q in range(5, 100, 5))
    keys = "year(measurement_date), month(measurement_date)"
    _prepare(meta, f"SELECT {keys}, COUNT(*) FROM measurement GROUP BY 1, 2")
    start = time.monotonic()
    with pytest.raises(QueryRefused) as info:
        _prepare(meta, f"SELECT {keys}, {quantiles} FROM measurement GROUP BY 1, 2")
    assert time.monotonic() - start < 2
    assert f"{MAX_PLAN_WORK:,}" in str(info.value)


@pytest.mark.parametrize("alias", ['"' + "x" * 64 + '"', '"my result; see note"',
                                   '"line\nbreak"', '"ünïcode"'])
def test_output_names_are_short_identifiers(meta: DatasetMetadata, alias: str) -> None:
    """Released files carry only engine-formatted text: no researcher prose in headers."""
    with pytest.raises(QueryRefused):
        _prepare(meta, f"SELECT COUNT(*) AS {alias} FROM measurement")
    _prepare(meta, f"SELECT COUNT(*) AS {'x' * 63} FROM measurement")
