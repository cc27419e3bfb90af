"""Ingest against DuckDB's own load of the same files, with peak memory.

Run: ``python -m bench.ingest --persons 200000 [--format csv|parquet] [--keep DIR]``.
Generates the dataset into a temporary directory (or ``--keep``), then, each in its own child
process (so its peak resident memory is its own):

* **raw DuckDB**: ``CREATE TABLE t AS SELECT * FROM read_csv(file, columns = the spec's types)``
  (or ``read_parquet``) for every file, into a fresh DuckDB file with the SPE's DuckDB settings
  (threads, memory limit): what loading costs without any check;
* **SPE ingest**: ``spe.datasets.ingest.ingest`` with every check it makes (types, required
  values, keys, date ranges, links, ranks, metadata, atomic registration).

Prints per table and in total the rows, seconds of each and their ratio, and each process's
peak RSS. Generation time is printed for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spe.datasets import generator


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _raw_load(source: Path, work: Path) -> dict[str, float]:
    """DuckDB's own load of every table file (no checks), seconds per table."""
    import duckdb

    from spe.config import Settings
    from spe.datasets.ingest import discover
    from spe.datasets.omop_spec import load_spec

    settings = Settings(data_dir=work / "var")
    specs = load_spec()
    target = work / "raw.duckdb"
    con = duckdb.connect(str(target))
    con.execute(f"SET threads = {int(settings.duckdb_threads)}")
    con.execute(f"SET memory_limit = {_lit(settings.duckdb_memory_limit)}")
    con.execute(f"SET temp_directory = {_lit(str(work / 'raw.spill'))}")
    seconds: dict[str, float] = {}
    for sf in discover(source):
        types = specs[sf.table].duckdb_columns()
        started = time.perf_counter()
        if sf.kind == "parquet":
            src = f"read_parquet({_lit(str(sf.path))})"
        else:
            cols = "{" + ", ".join(f"{_lit(c)}: {_lit(types[c])}" for c in sf.columns) + "}"
            src = (f"read_csv({_lit(str(sf.path))}, header=true, auto_detect=false, "
                   f"delim={_lit(sf.delimiter or ',')}, quote='\"', escape='\"', "
                   f"columns={cols})")
        con.execute(f'CREATE TABLE "{sf.table}" AS SELECT * FROM {src}')
        seconds[sf.table] = time.perf_counter() - started
    con.execute("CHECKPOINT")
    con.close()
    return seconds


def _spe_ingest(source: Path, work: Path) -> dict[str, float]:
    from spe.auth.principal import operator_principal
    from spe.config import Settings
    from spe.datasets.ingest import ingest
    from spe.db import Database

    settings = Settings(data_dir=work / "var")
    db = Database(settings.resolved_database_url)
    db.upgrade()
    result = ingest(db, settings, "bench", source, operator_principal("bench"))
    db.dispose()
    return result.seconds


def _child(kind: str, source: Path, work: Path) -> tuple[dict[str, float], float, int]:
    """Run one phase in a child process: (seconds per table, wall seconds, peak RSS bytes)."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.ingest", "--child", kind,
                             "--source", str(source), "--work", str(work)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{kind} phase failed (status {status})")
    proc.returncode = 0
    return json.loads(out), wall, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the generated files here and keep them")
    parser.add_argument("--child", choices=["raw", "spe"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        phase = _raw_load if args.child == "raw" else _spe_ingest
        print(json.dumps(phase(args.source, args.work)))
        return

    with tempfile.TemporaryDirectory(prefix="spe-bench-") as tmp:
        work = Path(tmp)
        source = args.keep or work / "source"
        t0 = time.perf_counter()
        gen = generator.generate(source, args.persons, seed=args.seed, fmt=args.format,
                                 progress=True)
        gen_wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in source.iterdir())
        raw, raw_wall, raw_rss = _child("raw", source, work / "raw")
        spe, spe_wall, spe_rss = _child("spe", source, work / "spe")

    print(f"\npersons {args.persons:,}  format {args.format}  source {size / 1e6:,.0f} MB  "
          f"cpus {os.cpu_count()}  (generated in {gen_wall:.1f} s)")
    header = (f"{'table':<22} {'rows':>12} {'raw DuckDB s':>13} {'SPE ingest s':>13} "
              f"{'ratio':>6}")
    print(header)
    print("-" * len(header))
    rows: dict[str, Any] = gen.rows
    for table in generator.TABLES:
        r, s = raw.get(table, 0.0), spe.get(table, 0.0)
        ratio = f"{s / r:.2f}x" if r > 0 else "-"
        print(f"{table:<22} {rows[table]:>12,} {r:>13.2f} {s:>13.2f} {ratio:>6}")
    print("-" * len(header))
    print(f"{'total (process wall)':<22} {gen.total_rows:>12,} {raw_wall:>13.2f} "
          f"{spe_wall:>13.2f} {spe_wall / raw_wall:>5.2f}x")
    print(f"{'peak RSS':<22} {'':>12} {raw_rss / 2**20:>10,.0f} MB {spe_rss / 2**20:>10,.0f} MB "
          f"{spe_rss / raw_rss:>5.2f}x")


if __name__ == "__main__":
    main()
