"""bench/dp_query runs on a tiny dataset and prints every query with raw and DP time and memory.

Also pins what the engine accepts of the two daily queries the benchmark holds to issue 17's
bounds as written: the three-table cohort count and the age-at-first-diagnosis histogram.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import dp_query
from spe.dp.runner import prepare
from spe.dp.testing import make_dataset, make_terms
from spe.errors import QueryRefused

COLUMNS = ["query", "raw ms", "dp ms", "dp/raw", "raw MB", "dp MB", "bound", "note"]


def test_bench_prints_every_query_with_times_memory_and_bound(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.dp_query", "--persons", "300", "--runs", "1",
         "--no-polars", "--no-http", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=True).stdout
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("query"))
    for column in COLUMNS:
        assert column in header, column
    assert list((tmp_path / "data").glob("omop_ranked_300_10.duckdb"))  # the rank-ordered cache
    assert "a process running no query peaks at" in out
    for name, _raw, dp_sql in dp_query.QUERIES:
        row = next((line for line in lines if line.startswith(name)), None)
        assert row is not None, f"missing row: {name}"
        cells = row[len(name):].split()
        raw_ms, raw_mb = float(cells[0]), float(cells[3])
        assert raw_ms > 0 and 20 < raw_mb < 4000
        if dp_sql is None:
            assert row.endswith(dp_query.REFUSED_NOTE)
            continue
        dp_ms, ratio, dp_mb, bound = float(cells[1]), float(cells[2]), float(cells[4]), cells[5]
        assert dp_ms > 0 and 20 < dp_mb < 4000
        assert ratio == pytest.approx(dp_ms / raw_ms, rel=0.1, abs=0.02)
        assert bound in {"ok", "MISSED"}
        if bound == "MISSED":  # the note names the bound that was missed
            assert "> 1.2x" in row or "% > +10%" in row


def test_engine_accepts_the_cohort_and_first_diagnosis_forms(tmp_path: Path) -> None:
    meta = make_dataset(tmp_path / "d.duckdb", persons=200)
    terms = make_terms(meta, epsilon=1e6, max_epsilon_per_query=10)
    by_name = {name: (raw, dp) for name, raw, dp in dp_query.QUERIES}
    for name in ("cohort count, 3 tables, date filters", "age at first diagnosis histogram"):
        raw, dp = by_name[name]
        assert dp == raw  # the engine runs it as written
        prepare(dp, meta, terms, epsilon=1.0, delta=1e-6)
    cte = ("WITH f AS (SELECT person_id, MIN(condition_start_date) AS d FROM "
           "condition_occurrence GROUP BY person_id) SELECT year(f.d) - p.year_of_birth AS age, "
           "COUNT(*) FROM f JOIN person p ON f.person_id = p.person_id GROUP BY 1")
    assert prepare(cte, meta, terms, epsilon=1.0, delta=1e-6).plan.rows_per_person == 1
    per_row_min = ("SELECT p.year_of_birth, MIN(year(c.condition_start_date)) FROM person p "
                   "JOIN condition_occurrence c ON p.person_id = c.person_id GROUP BY 1")
    with pytest.raises(QueryRefused):  # MIN is released only per person, inside a derived table
        prepare(per_row_min, meta, terms, epsilon=1.0, delta=1e-6)


def test_bench_runs_only_the_queries_asked_for(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.dp_query", "--persons", "300", "--runs", "1",
         "--no-polars", "--no-http", "--data-dir", str(tmp_path), "--query", "by gender"],
        capture_output=True, text=True, timeout=600, check=True).stdout
    names = [name for name, _raw, _dp in dp_query.QUERIES
             if any(line.startswith(name + " ") for line in out.splitlines())]
    assert names == ["count by gender"]
