"""Benchmark the DP query engine against raw DuckDB and OpenDP's Polars API.

Usage: ``python -m bench.dp_query --persons 1000000 --rows-per-person 10 --runs 5``

The synthetic OMOP-like dataset (with the ingest rank column) is generated once into
``var/bench/data`` and reused by later runs with the same size; its tables are also exported
to Parquet there for the Polars comparison. The per-person tables are stored in rank
order, as ingest stores them; the cache file is named ``omop_ranked_<persons>_<rows>`` so a
cache in the older row order is never reused. For each query of a fixed set (including a
cohort count over three joined tables with date filters and the age-at-first-diagnosis
histogram over a per-person derived table), raw DuckDB (the same SQL, no
truncation, no noise) and the DP engine (plan, truncation, OpenDP noise) each run in a fresh
process of this module, the same way (same imports, same DuckDB settings, a warm-up, then the
median of ``--runs`` runs); the table prints both times, their ratio, both processes' peak
memory (VmHWM), a ``bound`` column against issue 17's bounds (dp/raw <= 1.2x, dp peak <=
raw peak + 10 %) and a note saying which bound is missed. OpenDP's Polars API is timed too
where it can express the query.

OpenDP's Polars API (``opendp[polars]``) pins its own polars version, which differs from the
project's, so it runs in a separate virtual environment created under
``var/bench/opendp-polars`` (same OpenDP version as the project; reused while the version
matches), one subprocess per query on the same Parquet data. If that environment cannot be
installed the column says why and the rest of the table is still printed.

``dp ms`` and ``dp/raw`` are the engine without answer-time padding; ``padded ms`` is the same
run padded as the service pads answers (``dp_answer_time_bucket_seconds``, its own column).

End to end over HTTP (``--http-persons``, default 20,000; ``--no-http`` skips it): a generated
OMOP dataset goes through the real ingest into a temporary SPE (SQLite control database), a
permit is issued, a real workspace token is minted, and the API runs under uvicorn in its own
process. One keep-alive client sends the queries one after another; p50 and p99 of the answer
and of the dry run are printed next to raw DuckDB running the same SQL on the same store file,
without padding (the limits are raised so they do not interfere) and with the default padding.
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
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spe.config import Settings
from spe.datasets.metadata import ROW_RANK_COLUMN, DatasetMetadata
from spe.dp import duck
from spe.dp.engine import execute, needs_row_stats, row_stats_sql
from spe.dp.runner import prepare
from spe.dp.service import pad_answer_time
from spe.dp.testing import make_dataset, make_terms
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "var" / "bench"

# (name, raw SQL, the SQL given to the DP engine or None where it refuses every form tried).
_COHORT = ("SELECT COUNT(DISTINCT p.person_id) FROM person p "
           "JOIN condition_occurrence c ON p.person_id = c.person_id "
           "JOIN drug_exposure d ON p.person_id = d.person_id "
           "WHERE c.condition_start_date >= DATE '2015-01-01' "
           "AND d.drug_exposure_start_date >= DATE '2016-01-01'")
# Age at FIRST diagnosis: each person's first condition date in a per-person derived table
# (spe.dp.derived), joined to person; the engine runs it as written.
_FIRST_DIAGNOSIS = ("SELECT year(f.d) - p.year_of_birth AS age, COUNT(*) FROM "
                    "(SELECT person_id, MIN(condition_start_date) AS d "
                    "FROM condition_occurrence GROUP BY person_id) f "
                    "JOIN person p ON f.person_id = p.person_id GROUP BY 1")
QUERIES: list[tuple[str, str, str | None]] = [(name, sql, sql) for name, sql in [
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
    ("cohort count, 3 tables, date filters", _COHORT),
    ("age at first diagnosis histogram", _FIRST_DIAGNOSIS),
]]
REFUSED_NOTE = "refused by the engine"
QUERY_NOTES: dict[str, str] = {}
TIME_BOUND = 1.2  # dp/raw wall time
FIXED_COST_MS = 1.0  # a time miss smaller than this is the engine's fixed cost, said so
MEMORY_BOUND = 1.10  # dp peak RSS <= raw peak RSS + 10 %
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
POLARS_NA = {4: "n/a: no joins of private tables", 6: "n/a: no joins of private tables",
             7: "n/a: no per-person derived tables"}


def _peak_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` where /proc has it.

    Not ``ru_maxrss``: Linux carries the forking parent's peak into it across exec, so a
    worker started by a large parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
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


def dataset(base: Path, persons: int, rows_per_person: int, parquet: bool = True
            ) -> tuple[Path, DatasetMetadata, Path]:
    """The cached dataset file, its metadata and its Parquet export (built on first use).

    The per-person tables are stored in rank order, as ingest stores them; the cache name
    says so (``omop_ranked_...``), so a cache written in the older row order is never reused.
    The Parquet export (for the Polars comparison) is written only when ``parquet``.
    """
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    stem = f"omop_ranked_{persons}_{rows_per_person}"
    path, meta_path, parquet_dir = (data / f"{stem}.duckdb", data / f"{stem}.meta.json",
                                    data / f"{stem}.parquet")
    if path.exists() and meta_path.exists():
        meta = DatasetMetadata.model_validate_json(meta_path.read_text())
        _progress(f"reusing {path}")
    else:
        for p in (path, meta_path):
            p.unlink(missing_ok=True)
        _progress(f"generating {persons} persons x {rows_per_person} measurement rows "
                  "(rank-ordered, with the ingest row rank) ...")
        t = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        meta = make_dataset(tmp, persons=persons, rows_per_person=rows_per_person)
        tmp.rename(path)
        meta_path.write_text(meta.model_dump_json())
        _progress(f"generated in {time.perf_counter() - t:.1f}s")
    if not parquet:
        return path, meta, parquet_dir
    parquet_dir.mkdir(exist_ok=True)
    import duckdb

    con = None
    for i, table in enumerate(POLARS_TABLES, 1):
        out = parquet_dir / f"{table}.parquet"
        if out.exists():
            continue
        con = con or duckdb.connect(str(path), read_only=True)
        _progress(f"[{i}/{len(POLARS_TABLES)}] exporting {table} to Parquet")
        con.execute(f"COPY (SELECT * EXCLUDE ({ROW_RANK_COLUMN}) FROM {table}) TO "
                    f"'{out.with_suffix('.tmp')}' (FORMAT parquet)")
        out.with_suffix(".tmp").rename(out)
    if con is not None:
        con.close()
    return path, meta, parquet_dir


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


def _worker(args: argparse.Namespace) -> None:
    """One measurement in this fresh process: prints one JSON line (see :func:`measure`)."""
    path, meta, _ = dataset(args.data_dir, args.persons, args.rows_per_person, parquet=False)
    settings = _settings(args)
    _name, raw_sql, dp_sql = QUERIES[args.index]
    con = duck.connect(path, settings)  # same instance settings for raw and DP
    out: dict[str, float] = {}
    if args.worker == "none":
        out["peak_mb"] = _peak_mb()
    elif args.worker == "raw":
        out["median_s"] = _median_time(lambda: con.execute(raw_sql).fetchall(), args.runs)
        out["peak_mb"] = _peak_mb()
    else:
        assert dp_sql is not None
        terms = make_terms(meta, epsilon=1e6, max_epsilon_per_query=10)
        prep = prepare(dp_sql, meta, terms, epsilon=1.0, delta=1e-6)

        def dp_run() -> None:
            execute(prep.plan, prep.cost.units, con, settings)

        out["median_s"] = _median_time(dp_run, args.runs)
        out["peak_mb"] = _peak_mb()  # before the padded and planning runs below
        # Where a fixed cost comes from (measured before the padded runs, whose sleeps leave
        # the caches colder): the plan's first statement alone, and a 3-row pandas table
        # built right after a statement (cold caches) against the same build repeated.
        if needs_row_stats(prep.plan):
            stats_sql = row_stats_sql(prep.plan, None, None)[0]
            out["stmt_s"] = _median_time(lambda: duck.run(con, stats_sql, 600), args.runs)
        out["cold_table_s"], out["warm_table_s"] = _table_build_times(con, raw_sql, args.runs)

        def padded_run() -> None:
            started = time.monotonic()
            execute(prep.plan, prep.cost.units, con, settings)
            pad_answer_time(started, args.bucket)

        out["padded_s"] = _median_time(padded_run, args.runs)
        out["plan_s"] = _median_time(lambda: prepare(dp_sql, meta, terms, epsilon=1.0,
                                                     delta=1e-6), args.runs)
    con.close()
    print(json.dumps(out))


def _table_build_times(con: Any, sql: str, runs: int) -> tuple[float, float]:
    """Median seconds to build a 3-row pandas table right after ``sql`` ran, and again."""
    import pandas as pd

    columns = {"key": [8507, 8532, 0], "count": [5021, 4977, 2]}
    cold, warm = [], []
    for _ in range(max(runs, 5)):
        con.execute(sql).fetchall()
        t = time.perf_counter()
        pd.DataFrame(columns)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        pd.DataFrame(columns)
        warm.append(time.perf_counter() - t)
    return statistics.median(cold), statistics.median(warm)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(data_dir=args.data_dir / "var", duckdb_threads=args.threads,
                    duckdb_memory_limit="4GB")


def measure(args: argparse.Namespace, kind: str, index: int) -> dict[str, float]:
    """Run query ``index`` raw or through the DP engine in a fresh process of this module.

    Both kinds run the same way: the same imports, the same DuckDB instance settings on the
    same file, a warm-up then ``--runs`` timed runs; the peak is the process's max RSS
    (``VmHWM``, see :func:`_peak_mb`) right after the timed runs. ``kind`` "none" runs no
    query (the floor: imports and the connection). Raises ``RuntimeError`` if it fails.
    """
    cmd = [sys.executable, "-m", "bench.dp_query", "--worker", kind, "--index", str(index),
           "--data-dir", str(args.data_dir), "--persons", str(args.persons),
           "--rows-per-person", str(args.rows_per_person), "--runs", str(args.runs),
           "--threads", str(args.threads), "--bucket", str(args.bucket)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{kind} worker for query {index} failed: {tail[:200]}")
    return dict(json.loads(lines[-1]))


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per field, the median over the processes' measurements."""
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def _bound_note(ratio: float, raw_mb: float, dp_mb: float) -> tuple[str, str]:
    """('ok' or 'MISSED', what was missed) against the bounds of issue 17."""
    misses = []
    if ratio > TIME_BOUND:
        misses.append(f"time {ratio:.2f}x > {TIME_BOUND}x")
    if dp_mb > raw_mb * MEMORY_BOUND:
        misses.append(f"memory +{(dp_mb / raw_mb - 1) * 100:.1f}% > "
                      f"+{(MEMORY_BOUND - 1) * 100:.0f}%")
    return ("ok", "") if not misses else ("MISSED", "; ".join(misses))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, default=1_000_000)
    ap.add_argument("--rows-per-person", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--data-dir", type=Path, default=BENCH_DIR,
                    help="where the generated dataset is cached (default var/bench)")
    ap.add_argument("--polars-runs", type=int, default=3,
                    help="runs per query in OpenDP's Polars API (each has a fixed cost)")
    ap.add_argument("--polars-timeout", type=float, default=600.0)
    ap.add_argument("--no-polars", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=1,
                    help="fresh processes per query and kind, run alternately raw/dp; times "
                    "and peaks are the medians over them (peak memory moves by about 10 %% "
                    "between processes)")
    ap.add_argument("--bucket", type=float,
                    default=Settings.model_fields["dp_answer_time_bucket_seconds"].default,
                    help="answer-time padding bucket in seconds (the padded column)")
    ap.add_argument("--query", action="append", default=[],
                    help="run only the queries whose name contains this text (repeatable)")
    ap.add_argument("--no-http", action="store_true", help="skip the end-to-end HTTP part")
    ap.add_argument("--http-persons", type=int, default=20_000)
    ap.add_argument("--http-requests", type=int, default=200,
                    help="requests per measurement over HTTP (padded runs: a fifth)")
    ap.add_argument("--http-only", action="store_true", help="only the HTTP part")
    ap.add_argument("--worker", choices=("raw", "dp", "none"), help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.http_only:
        http_bench(args.http_persons, args.http_requests, args.bucket)
        return
    _path, meta, parquet = dataset(args.data_dir, args.persons, args.rows_per_person,
                                   parquet=not args.no_polars)
    print(f"dataset: {args.persons} persons, {meta.tables['measurement'].row_count} "
          f"measurement rows")
    py, polars_note = (None, "skipped (--no-polars)") if args.no_polars else polars_env()
    k = meta.tables["measurement"].max_rows_per_person
    floor = measure(args, "none", 0)["peak_mb"]
    rows = []
    for index, (name, _raw_sql, dp_sql) in enumerate(QUERIES):
        if args.query and not any(q in name for q in args.query):
            continue
        _progress(f"[{index + 1}/{len(QUERIES)}] {name}")
        raws, dps = [], []
        for _ in range(max(1, args.processes)):
            raws.append(measure(args, "raw", index))
            if dp_sql is not None:
                dps.append(measure(args, "dp", index))
        raw, dp = _medians(raws), (_medians(dps) if dps else None)
        pl_t, pl_peak, note = (None, None, "")  # the polars column's note, when it runs
        if py is not None:
            pl_t, pl_peak, note = polars_time(py, parquet, index, args.polars_runs, k, meta,
                                              args.polars_timeout)
        rows.append((name, raw, dp, pl_t, pl_peak, note))
    header = (f"{'query':36} {'raw ms':>8} {'dp ms':>8} {'dp/raw':>6} {'raw MB':>6} "
              f"{'dp MB':>6} {'bound':>6} {'plan ms':>7} {'padded ms':>9} {'polars ms':>9} "
              f"{'pl MB':>6}  note")
    print(header)
    print("-" * len(header))
    for name, raw, dp, pl_t, pl_peak, note in rows:
        pl_ms = f"{pl_t * 1e3:9.1f}" if pl_t is not None else f"{'-':>9}"
        pl_mb = f"{pl_peak:6.0f}" if pl_peak is not None else f"{'-':>6}"
        raw_part = f"{name:36} {raw['median_s'] * 1e3:8.1f}"
        if dp is None:
            print(f"{raw_part} {'-':>8} {'-':>6} {raw['peak_mb']:6.0f} {'-':>6} "
                  f"{'-':>6} {'-':>7} {'-':>9} {pl_ms} {pl_mb}  {REFUSED_NOTE}")
            continue
        ratio = dp["median_s"] / raw["median_s"]
        bound, missed = _bound_note(ratio, raw["peak_mb"], dp["peak_mb"])
        why = ""
        extra_ms = (dp["median_s"] - raw["median_s"]) * 1e3
        if "time" in missed and extra_ms < FIXED_COST_MS:
            stmt = (f"the DP statement alone {dp['stmt_s'] * 1e3:.1f} ms, "
                    if "stmt_s" in dp else "")
            why = "; ".join(x for x in (why, (
                f"time: +{extra_ms:.1f} ms is the engine's fixed cost per answer on a "
                f"{raw['median_s'] * 1e3:.1f} ms query ({stmt}the rest Python after it: "
                f"noise, the released table; it runs on cold caches: a 3-row pandas table "
                f"takes {dp['cold_table_s'] * 1e6:.0f} us right after a statement, "
                f"{dp['warm_table_s'] * 1e6:.0f} us repeated)")) if x)
        notes = "; ".join(n for n in (missed, QUERY_NOTES.get(name, ""), why, note) if n)
        print(f"{raw_part} {dp['median_s'] * 1e3:8.1f} {ratio:6.2f} {raw['peak_mb']:6.0f} "
              f"{dp['peak_mb']:6.0f} {bound:>6} {dp['plan_s'] * 1e3:7.1f} "
              f"{dp['padded_s'] * 1e3:9.1f} {pl_ms} {pl_mb}  {notes}")
    print(f"threads={args.threads}, runs={args.runs} (median; polars runs="
          f"{args.polars_runs}); raw and dp each in a fresh process (x{args.processes}, "
          "medians), MB = its peak RSS (VmHWM); "
          f"bound: dp/raw <= {TIME_BOUND}x and dp MB <= raw MB + "
          f"{(MEMORY_BOUND - 1) * 100:.0f}%; a process running no query peaks at "
          f"{floor:.0f} MB; polars: {polars_note}")
    print("distinct persons by year: exact per-person year sets, each person kept in m="
          f"{meta.max_groups_per_person} year(s) (the raw query counts a person in every "
          f"year: not like for like); padded: answer time padded to {args.bucket:g} s buckets")
    if not args.no_http:
        http_bench(args.http_persons, args.http_requests, args.bucket)


# End to end over HTTP -------------------------------------------------------------------------

HTTP_QUERIES = [
    ("COUNT(*) person", "SELECT COUNT(*) FROM person"),
    ("count by gender", "SELECT gender_concept_id, COUNT(*) FROM person GROUP BY 1"),
]
HOST = "127.0.0.1"
NO_LIMITS = {"SPE_API_TOKEN_REQUESTS_PER_MINUTE": "1e9", "SPE_API_TOKEN_BURST": "1000000000",
             "SPE_DP_PERMIT_QUERIES_PER_MINUTE": "1e9",
             "SPE_DP_PERMIT_QUERY_BURST": "1000000000"}


def _http_setup(data_dir: Path, persons: int) -> tuple[str, str, Path]:
    """A temporary SPE with one ingested dataset, one permit and a workspace token:
    (permit id, token, store file)."""
    from datetime import UTC, datetime, timedelta

    from permits.schemas import PermitCreate
    from permits.service import PermitService
    from spe.auth.principal import SYSTEM, Principal, Role
    from spe.auth.workspace_tokens import mint_workspace_token
    from spe.datasets import generator
    from spe.datasets.ingest import ingest
    from spe.datasets.registry import open_dataset
    from spe.db import Database

    settings = Settings(data_dir=data_dir / "var")
    db = Database(settings.resolved_database_url)
    db.upgrade()
    _progress(f"generating and ingesting {persons} persons for the HTTP benchmark ...")
    generator.generate(data_dir / "src", persons, seed=1)
    ingest(db, settings, "bench", data_dir / "src", SYSTEM)
    now = datetime.now(UTC)
    body = {
        "reference": f"BENCH-DP-{int(now.timestamp())}", "title": "DP query benchmark",
        "holder": {"organisation": "Bench Institute", "principal_investigator": "Dr Bench"},
        "purposes": ["scientific_research"], "purpose_justification": "benchmark",
        "datasets": [{"dataset": "bench",
                      "tables": {"person": ["person_id", "gender_concept_id",
                                            "year_of_birth"]}}],
        "persons": ["alice"], "valid_from": (now - timedelta(days=1)).isoformat(),
        "valid_until": (now + timedelta(days=30)).isoformat(),
        "privacy_budget": {"epsilon": 100, "delta": 1e-6, "max_epsilon_per_query": 1},
    }
    body_ab = Principal(subject="bench", username="hdab-alpha", kind="service",
                        roles=frozenset({Role.ACCESS_BODY}), access_body="hdab-alpha")
    permit_id = PermitService(db).issue(body_ab, PermitCreate.model_validate(body)).permit_id
    with db.write() as session:
        token = mint_workspace_token(session, settings, subject="alice-subject",
                                     username="alice", permit_id=permit_id,
                                     workspace_id="ws-bench").token
    _meta, path = open_dataset(db, settings, "bench")
    db.dispose()
    return permit_id, token, path


def _pcts(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    q = statistics.quantiles(times, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def _serve(data_dir: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    env = {**os.environ, "SPE_DATA_DIR": str(data_dir / "var"), "SPE_LOG_LEVEL": "WARNING",
           **NO_LIMITS, **extra_env}
    env.pop("SPE_DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "spe.api.app:create_app", "--factory", "--host",
         HOST, "--port", str(port), "--workers", "1", "--log-level", "warning",
         "--no-access-log"], env=env)
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the API server exited at start")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the API server did not become ready")


def _http_times(base: str, permit_id: str, token: str, sql: str, n: int, dry: bool
                ) -> list[float]:
    import httpx

    url = f"/v1/permits/{permit_id}/queries"
    payload = {"sql": sql, "epsilon": 0.01, "dry_run": dry}
    out = []
    with httpx.Client(base_url=base, timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        for i in range(n + 3):
            t = time.perf_counter()
            r = client.post(url, json=payload)
            elapsed = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"HTTP benchmark: {r.status_code} {r.text[:200]}")
            if i >= 3:  # warm-up
                out.append(elapsed)
    return out


def http_bench(persons: int, requests: int, bucket: float) -> None:
    """p50/p99 of a query and its dry run over HTTP against raw DuckDB (see module doc)."""
    with tempfile.TemporaryDirectory(prefix="spe-bench-dp-") as tmp:
        data_dir = Path(tmp)
        permit_id, token, store = _http_setup(data_dir, persons)
        import duckdb

        raw = duckdb.connect(str(store), read_only=True)
        results = []
        for padded in (False, True):
            env = {"SPE_DP_ANSWER_TIME_BUCKET_SECONDS": str(bucket if padded else 0)}
            proc, base = _serve(data_dir, env)
            n = max(10, requests // 5) if padded else requests
            try:
                for name, sql in HTTP_QUERIES:
                    _progress(f"HTTP {'padded ' if padded else ''}{name}: {n} requests")
                    raw_t = []
                    for _ in range(n):
                        t = time.perf_counter()
                        raw.execute(sql).fetchall()
                        raw_t.append(time.perf_counter() - t)
                    ans = _http_times(base, permit_id, token, sql, n, dry=False)
                    dry = _http_times(base, permit_id, token, sql, n, dry=True)
                    results.append((name, padded, _pcts(raw_t), _pcts(ans), _pcts(dry)))
            finally:
                proc.terminate()
                proc.wait(30)
        raw.close()
        stages = stage_breakdown(data_dir, permit_id, HTTP_QUERIES[0][1], requests)
    print()
    print(f"end to end over HTTP: {persons} persons, workspace token, uvicorn 1 worker, "
          f"SQLite control database, sequential requests ({requests}; padded: a fifth)")
    header = (f"{'query':20} {'padding':>8} {'raw p50':>8} {'raw p99':>8} {'ans p50':>8} "
              f"{'ans p99':>8} {'dry p50':>8} {'dry p99':>8} {'ans-raw p50':>11}")
    print(header)
    print("-" * len(header))
    for name, padded, (r50, r99), (a50, a99), (d50, d99) in results:
        pad = f"{bucket:g} s" if padded else "off"
        print(f"{name:20} {pad:>8} {r50:8.2f} {r99:8.2f} {a50:8.2f} {a99:8.2f} {d50:8.2f} "
              f"{d99:8.2f} {a50 - r50:11.2f}")
    print("ms; raw = DuckDB on the same store file, same SQL, no truncation or noise")
    print()
    print(f"where the time of one answer goes (in process, {HTTP_QUERIES[0][0]}, median of "
          f"{requests}; HTTP, token validation and the permit lookup come on top):")
    for stage, ms in stages:
        print(f"  {stage:58} {ms:7.3f} ms")


def stage_breakdown(data_dir: Path, permit_id: str, sql: str, n: int
                    ) -> list[tuple[str, float]]:
    """Median time of each step of :func:`spe.dp.service.run_query` for ``sql``."""
    from permits.service import get_terms
    from spe.datasets.registry import open_dataset
    from spe.db import Database
    from spe.dp import service
    from spe.dp.runner import release

    settings = Settings(data_dir=data_dir / "var", dp_answer_time_bucket_seconds=0)
    db = Database(settings.resolved_database_url)
    with db.read() as session:
        terms = get_terms(session, permit_id)
    caller = service.Caller(actor="alice")
    req = service.QueryRequest(sql=sql, epsilon=0.01)

    def opener(name: str) -> tuple[DatasetMetadata, Path]:
        return open_dataset(db, settings, name)

    meta, path = opener("bench")
    prep = prepare(sql, meta, terms, epsilon=0.01, delta=1e-7)
    rel = release(prep, path, settings)
    details = {"sql": sql, "sql_sha256": "0" * 64, "dataset": "bench"}

    def final_txn() -> None:
        charge = service._reserve(db, caller, terms, req, prep, details)
        t = time.perf_counter()
        with db.write() as session:
            service.ledger.finish(session, charge, released=True)
            service.ledger.snapshot(session, terms, caller.actor)
            service.record(session, service._event(caller, terms, service.Outcome.SUCCESS,
                                                   {**details, "charge_id": charge}))
        final.append(time.perf_counter() - t)

    final: list[float] = []
    for _ in range(n):
        final_txn()
    steps: list[tuple[str, Callable[[], object]]] = [
        ("whole service call (run_query, no padding)",
         lambda: service.run_query(db, settings, terms, caller, req, opener)),
        ("dataset lookup (registry read)", lambda: opener("bench")),
        ("parse, plan, price (OpenDP maps)",
         lambda: prepare(sql, meta, terms, epsilon=0.01, delta=1e-7)),
        ("reserve: ledger + audit entry, one commit",
         lambda: service._reserve(db, caller, terms, req, prep, details)),
        ("run on DuckDB + OpenDP noise (release)", lambda: release(prep, path, settings)),
        ("encode CSV + Parquet, sign the receipt",
         lambda: service._answer(settings, terms, prep, rel, "0" * 32, "bench")),
        ("dry run (plan + budget read + audit entry, one commit)",
         lambda: service.run_query(db, settings, terms, caller,
                                   service.QueryRequest(sql=sql, epsilon=0.01, dry_run=True),
                                   opener)),
    ]
    out = [(name, _median_time(fn, n) * 1e3) for name, fn in steps]
    out.insert(5, ("finish: charge released + audit entry, one commit",
                   statistics.median(final) * 1e3))
    db.dispose()
    return out


if __name__ == "__main__":
    main()
