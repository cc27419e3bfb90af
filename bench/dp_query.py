"""Benchmark the DP query engine against raw DuckDB and OpenDP's Polars API.

Usage: ``python -m bench.dp_query --persons 1000000 --rows-per-person 10 --runs 5``

The synthetic OMOP-like dataset (with the ingest rank column) is generated once into
``var/bench/data`` and reused by later runs with the same size; its tables are also exported
to Parquet there for the Polars comparison. For each query of a fixed set, the median wall time
of ``--runs`` runs is printed for raw DuckDB (the same SQL, no truncation, no noise), for the DP
engine (plan, truncation, OpenDP noise, on a locked-down read-only connection) and for OpenDP's
Polars API where it can express the query, with the ratios and peak memory (max RSS) of this
process and of the Polars worker.

OpenDP's Polars API (``opendp[polars]``) pins its own polars version, which differs from the
project's, so it runs in a separate virtual environment created under
``var/bench/opendp-polars`` (same OpenDP version as the project; reused while the version
matches), one subprocess per query on the same Parquet data. If that environment cannot be
installed the column says why and the rest of the table is still printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from spe.config import Settings
from spe.datasets.metadata import ROW_RANK_COLUMN, DatasetMetadata
from spe.dp import duck
from spe.dp.engine import execute
from spe.dp.runner import prepare
from spe.dp.testing import make_dataset, make_terms

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "var" / "bench"

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
POLARS_TABLES = ("person", "measurement")

# Runs inside the OpenDP Polars environment: argv = parquet dir, query index, runs, k, json
# metadata; prints one JSON line {"median_s": ..., "peak_mb": ...} or {"error": ...}.
# Each query mirrors the DP engine's plan: identifier person_id, at most k measurement rows
# per person (random), value bounds [0, 500], public keys, epsilon 1, delta 1e-6.
POLARS_WORKER = r'''
import json, resource, statistics, sys, time
import polars as pl
import opendp.prelude as dp

dp.enable_features("contrib")
data, index, runs, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
info = json.loads(sys.argv[5])
meas = pl.scan_parquet(f"{data}/measurement.parquet")
person = pl.scan_parquet(f"{data}/person.parquet")
loss = dp.loss_of(epsilon=1.0, delta=1e-6)
ident = dp.unit_of(contributions=1, identifier=pl.col("person_id"))
n_max = info["measurement_rows"]
v = pl.col("value_as_number")


def measurement_context(margins):
    return dp.Context.compositor(data=meas, privacy_unit=ident, privacy_loss=loss,
                                 split_evenly_over=1, margins=margins)


def build():
    if index == 0:
        ctx = measurement_context([dp.polars.Margin(by=[], max_length=n_max)])
        return (ctx.query().truncate_per_group(k).filter(v > 100).select(dp.len()))
    if index == 1:  # one row per person: the row is the privacy unit
        ctx = dp.Context.compositor(
            data=person, privacy_unit=dp.unit_of(contributions=1), privacy_loss=loss,
            split_evenly_over=1, margins=[dp.polars.Margin(by=["gender_concept_id"],
                                                           invariant="keys")])
        return ctx.query().group_by("gender_concept_id").agg(dp.len())
    if index == 2:
        ctx = measurement_context([dp.polars.Margin(
            by=["measurement_concept_id"], invariant="keys", max_length=n_max,
            max_groups=len(info["concepts"]))])
        keys = pl.LazyFrame({"measurement_concept_id": info["concepts"]},
                            schema={"measurement_concept_id": pl.Int64})
        return (ctx.query().filter(v.is_not_null() & v.is_not_nan()).truncate_per_group(k)
                .group_by("measurement_concept_id")
                .agg(v.dp.mean(bounds=(0.0, 500.0))).with_keys(keys))
    if index == 3:  # exact per-person year set, each person kept in one year
        # keep="first": OpenDP 0.16's "sample" fails on a one-column key (duplicate field)
        year = pl.col("measurement_date").dt.year().alias("y")
        ctx = dp.Context.compositor(
            data=meas.with_columns(year), privacy_unit=ident, privacy_loss=loss,
            split_evenly_over=1,
            margins=[dp.polars.Margin(by=["y"], invariant="keys", max_length=n_max)])
        return (ctx.query().truncate_num_groups(1, by=["y"], keep="first")
                .truncate_per_group(1, by=["y"]).group_by("y").agg(dp.len()))
    if index == 5:
        ctx = measurement_context([dp.polars.Margin(by=[], max_length=n_max)])
        cands = [i * 0.25 for i in range(2001)]
        return (ctx.query().filter(v.is_not_null() & v.is_not_nan()).truncate_per_group(k)
                .select(v.clip(0.0, 500.0).dp.median(cands)))
    raise NotImplementedError


try:
    def once():
        build().release().collect()

    once()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"median_s": statistics.median(times), "peak_mb": peak}))
except Exception as err:
    print(json.dumps({"error": f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"}))
'''
POLARS_NA = {4: "n/a: no joins of private tables"}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_time(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def dataset(persons: int, rows_per_person: int) -> tuple[Path, DatasetMetadata, Path]:
    """The cached dataset file, its metadata and its Parquet export (built on first use)."""
    data = BENCH_DIR / "data"
    data.mkdir(parents=True, exist_ok=True)
    stem = f"omop_{persons}_{rows_per_person}"
    path, meta_path, parquet = (data / f"{stem}.duckdb", data / f"{stem}.meta.json",
                                data / f"{stem}.parquet")
    if path.exists() and meta_path.exists():
        meta = DatasetMetadata.model_validate_json(meta_path.read_text())
        _progress(f"reusing {path.relative_to(ROOT)}")
    else:
        for p in (path, meta_path):
            p.unlink(missing_ok=True)
        _progress(f"generating {persons} persons x {rows_per_person} measurement rows "
                  "(with the ingest row rank) ...")
        t = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        meta = make_dataset(tmp, persons=persons, rows_per_person=rows_per_person)
        tmp.rename(path)
        meta_path.write_text(meta.model_dump_json())
        _progress(f"generated in {time.perf_counter() - t:.1f}s")
    parquet.mkdir(exist_ok=True)
    import duckdb

    con = None
    for i, table in enumerate(POLARS_TABLES, 1):
        out = parquet / f"{table}.parquet"
        if out.exists():
            continue
        con = con or duckdb.connect(str(path), read_only=True)
        _progress(f"[{i}/{len(POLARS_TABLES)}] exporting {table} to Parquet")
        con.execute(f"COPY (SELECT * EXCLUDE ({ROW_RANK_COLUMN}) FROM {table}) TO "
                    f"'{out.with_suffix('.tmp')}' (FORMAT parquet)")
        out.with_suffix(".tmp").rename(out)
    if con is not None:
        con.close()
    return path, meta, parquet


def polars_env() -> tuple[Path | None, str]:
    """The OpenDP Polars environment's python (created once), or None and why not."""
    try:
        version = importlib.metadata.version("opendp")
    except importlib.metadata.PackageNotFoundError:
        return None, "n/a: opendp not installed"
    env = BENCH_DIR / "opendp-polars"
    py = env / "bin" / "python"
    marker = env / ".spe-opendp-version"
    if marker.exists() and marker.read_text().strip() == version and py.exists():
        return py, f"opendp {version}"
    if py.exists():  # an environment from an earlier run: keep it if the version matches
        check = subprocess.run([str(py), "-c", "import importlib.metadata as m, polars; "
                                "print(m.version('opendp'))"], capture_output=True, text=True)
        if check.returncode == 0 and check.stdout.strip() == version:
            (env / "worker.py").write_text(POLARS_WORKER)
            marker.write_text(version)
            return py, f"opendp {version}"
    _progress(f"creating {env.relative_to(ROOT)} with opendp[polars]=={version} ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True,
                       capture_output=True, text=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"opendp[polars]=={version}"],
                       check=True, capture_output=True, text=True, timeout=900)
        (env / "worker.py").write_text(POLARS_WORKER)
    except (subprocess.SubprocessError, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        last = detail.strip().splitlines()[-1] if detail.strip() else type(err).__name__
        return None, f"n/a: install failed ({last[:60]})"
    marker.write_text(version)
    return py, f"opendp {version}"


def polars_time(py: Path, parquet: Path, index: int, runs: int, k: int,
                meta: DatasetMetadata, timeout: float) -> tuple[float | None, float | None, str]:
    """(median seconds, worker peak MB, note) of query ``index`` in OpenDP's Polars API."""
    if index in POLARS_NA:
        return None, None, POLARS_NA[index]
    worker = py.parent.parent / "worker.py"
    if not worker.exists() or worker.read_text() != POLARS_WORKER:
        worker.write_text(POLARS_WORKER)
    concepts = next(c for c in meta.tables["measurement"].columns
                    if c.name == "measurement_concept_id").public_values or ()
    info = json.dumps({"measurement_rows": meta.tables["measurement"].row_count,
                       "concepts": list(concepts)})
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("PYTHON")}
    try:
        proc = subprocess.run([str(py), str(worker), str(parquet), str(index), str(runs),
                               str(k), info], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return None, None, f"> {timeout:.0f}s (timeout)"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, None, f"error: {tail[:70]}"
    out = json.loads(lines[-1])
    if "error" in out:
        return None, None, f"error: {out['error'][:70]}"
    return float(out["median_s"]), float(out["peak_mb"]), ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, default=1_000_000)
    ap.add_argument("--rows-per-person", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--polars-runs", type=int, default=3,
                    help="runs per query in OpenDP's Polars API (each has a fixed cost)")
    ap.add_argument("--polars-timeout", type=float, default=600.0)
    ap.add_argument("--no-polars", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path, meta, parquet = dataset(args.persons, args.rows_per_person)
    print(f"dataset: {args.persons} persons, {meta.tables['measurement'].row_count} "
          f"measurement rows")
    settings = Settings(data_dir=BENCH_DIR / "var", duckdb_threads=args.threads,
                        duckdb_memory_limit="4GB")
    terms = make_terms(meta, epsilon=1e6, max_epsilon_per_query=10)
    raw = duck.connect(path, settings)  # same instance settings; raw SQL runs unmodified
    dpcon = duck.connect(path, settings)
    py, polars_note = (None, "skipped (--no-polars)") if args.no_polars else polars_env()
    k = meta.tables["measurement"].max_rows_per_person
    rows = []
    for index, (name, sql) in enumerate(QUERIES):
        _progress(f"[{index + 1}/{len(QUERIES)}] {name}")
        raw_t = _median_time(lambda sql=sql: raw.execute(sql).fetchall(), args.runs)
        prep = prepare(sql, meta, terms, epsilon=1.0, delta=1e-6)

        def dp_run(prep=prep) -> None:  # type: ignore[no-untyped-def]
            execute(prep.plan, prep.cost.units, dpcon, settings)

        dp_t = _median_time(dp_run, args.runs)
        plan_t = _median_time(lambda sql=sql: prepare(sql, meta, terms, epsilon=1.0,
                                                      delta=1e-6), args.runs)
        pl_t, pl_peak, note = (None, None, polars_note)
        if py is not None:
            pl_t, pl_peak, note = polars_time(py, parquet, index, args.polars_runs, k, meta,
                                              args.polars_timeout)
        rows.append((name, raw_t, dp_t, plan_t, pl_t, pl_peak, note, _peak_mb()))
    header = (f"{'query':34} {'raw ms':>8} {'dp ms':>8} {'plan ms':>7} {'dp/raw':>6} "
              f"{'polars ms':>9} {'pl/raw':>7} {'peak MB':>7} {'pl MB':>6}  note")
    print(header)
    print("-" * len(header))
    for name, raw_t, dp_t, plan_t, pl_t, pl_peak, note, peak in rows:
        pl_ms = f"{pl_t * 1e3:9.1f}" if pl_t is not None else f"{'-':>9}"
        pl_ratio = f"{pl_t / raw_t:7.1f}" if pl_t is not None else f"{'-':>7}"
        pl_mb = f"{pl_peak:6.0f}" if pl_peak is not None else f"{'-':>6}"
        print(f"{name:34} {raw_t * 1e3:8.1f} {dp_t * 1e3:8.1f} {plan_t * 1e3:7.1f} "
              f"{dp_t / raw_t:6.2f} {pl_ms} {pl_ratio} {peak:7.0f} {pl_mb}  {note}")
    print(f"threads={args.threads}, runs={args.runs} (median; polars runs="
          f"{args.polars_runs}), peak = max RSS (this process / polars worker), "
          f"polars: {polars_note}")
    print("distinct persons by year: exact per-person year sets, each person kept in m="
          f"{meta.max_groups_per_person} year(s) (the raw query counts a person in every "
          "year: not like for like)")


if __name__ == "__main__":
    main()
