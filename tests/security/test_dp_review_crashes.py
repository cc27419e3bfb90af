"""Queries the planner cannot price are refused with a named construct, never a server error."""

from __future__ import annotations

from pathlib import Path

import pytest

from spe.dp.runner import prepare
from spe.dp.testing import make_dataset, make_terms
from spe.errors import QueryRefused


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_dataset(Path(tmp_path_factory.mktemp("crash")) / "d.duckdb", persons=50)


@pytest.mark.parametrize("sql", [
    "SELECT COUNT(*) FROM person GROUP BY 1e400",
    "SELECT COUNT(*) FROM person ORDER BY 1e400",
    "SELECT SUM(ROUND(year_of_birth, 1e400)) FROM person",
    "SELECT VARIANCE(year_of_birth * 1e-200) FROM person",
    "SELECT SUM(year_of_birth * 1e-310) FROM person",
])
def test_refused_not_crashed(meta, sql: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(QueryRefused):
        prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6)
