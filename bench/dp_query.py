"""Benchmark the DP query engine against raw DuckDB on synthetic OMOP-like data.

Usage: ``python -m bench.dp_query --persons 100000 --rows-per-person 10 --runs 5``

For each query of a fixed set, the median wall time of ``--runs`` runs is printed for raw
DuckDB (the same SQL, no truncation, no noise) and for the DP engine (plan, truncation,
OpenDP noise, on a locked-down read-only connection), with the ratio and the process's peak
memory after each phase. OpenDP's Polars API is reported where it can be installed alongside
this environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import resource
import statistics
import tempfile
import time
from pathlib import Path

from spe.config import Settings
from spe.dp import duck
from spe.dp.engine import execute
from spe.dp.runner import prepare
from spe.dp.testing import make_dataset, make_terms

QUERIES = [
    ("global count with filter",
     "SELECT COUNT(*) FROM measurement WHERE value_as_number > 100"),
    ("count by gender", "SELECT gender_concept_id, COUNT(*) FROM person GROUP BY 1"),
    ("mean value by concept (truncated)",
     "SELECT measurement_concept_id, AVG(value_as_number) FROM measurement GROUP BY 1"),
    ("distinct persons by year",
     "SELECT year(measurement_date) AS y, COUNT(DISTINCT person_id) FROM measurement "
     "GROUP BY 1"),
    ("join condition x drug, filter",
     "SELECT COUNT(*) FROM condition_occurrence c JOIN drug_exposure d "
     "ON c.person_id = d.person_id WHERE d.drug_concept_id < 1100010"),
    ("median value", "SELECT MEDIAN(value_as_number) FROM measurement"),
]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_time(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _polars_note() -> str:
    try:
        req = importlib.metadata.requires("opendp") or []
        pin = next((r.split(";")[0] for r in req if r.startswith("polars==")), None)
        have = importlib.metadata.version("polars")
    except importlib.metadata.PackageNotFoundError:
        return "not available"
    if pin and pin.split("==")[1] != have:
        return f"n/a: opendp[polars] pins {pin}, env has polars {have}"
    return "not run"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, default=100_000)
    ap.add_argument("--rows-per-person", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="spe-bench-"))
    path = workdir / f"omop_{args.persons}_{args.rows_per_person}.duckdb"
    t = time.perf_counter()
    if path.exists():
        path.unlink()
    meta = make_dataset(path, persons=args.persons, rows_per_person=args.rows_per_person)
    print(f"dataset: {args.persons} persons, {meta.tables['measurement'].row_count} "
          f"measurement rows, built in {time.perf_counter() - t:.1f}s")
    settings = Settings(data_dir=workdir / "var", duckdb_threads=args.threads,
                        duckdb_memory_limit="4GB")
    terms = make_terms(meta, epsilon=1e6, max_epsilon_per_query=10)
    raw = duck.connect(path, settings)  # same instance settings; raw SQL runs unmodified
    dpcon = duck.connect(path, settings)
    polars_note = _polars_note()
    rows = []
    for name, sql in QUERIES:
        raw_t = _median_time(lambda sql=sql: raw.execute(sql).fetchall(), args.runs)
        raw_peak = _peak_mb()
        prep = prepare(sql, meta, terms, epsilon=1.0, delta=1e-6)

        def dp_run(prep=prep) -> None:  # type: ignore[no-untyped-def]
            execute(prep.plan, prep.cost.units, dpcon, settings)

        dp_t = _median_time(dp_run, args.runs)
        plan_t = _median_time(lambda sql=sql: prepare(sql, meta, terms, epsilon=1.0,
                                                      delta=1e-6), args.runs)
        rows.append((name, raw_t, dp_t, plan_t, dp_t / raw_t, raw_peak, _peak_mb()))
    header = (f"{'query':36} {'raw ms':>9} {'dp ms':>9} {'plan ms':>8} {'dp/raw':>7} "
              f"{'peak MB':>8}  opendp polars")
    print(header)
    print("-" * len(header))
    for name, raw_t, dp_t, plan_t, ratio, _rp, peak in rows:
        print(f"{name:36} {raw_t * 1e3:9.1f} {dp_t * 1e3:9.1f} {plan_t * 1e3:8.1f} "
              f"{ratio:7.2f} {peak:8.0f}  {polars_note}")
    print(f"threads={args.threads}, runs={args.runs} (median), peak = process max RSS")


if __name__ == "__main__":
    main()
