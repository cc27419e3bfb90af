"""Rows per second for generating and ingesting synthetic OMOP data.

Run: ``python -m bench.ingest --persons 1000000 [--format csv|parquet] [--keep DIR]``.
Generates the dataset into a temporary directory (or ``--keep``), ingests it into a temporary
store with a SQLite control database, and prints per table and in total the rows, the wall
seconds and rows/s of each phase. Generation time per table includes building and writing its
chunks; ingest time per table includes loading, checks and the per-person row rank; totals
include everything (ingest total also hashes the source files and registers the dataset).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from spe.auth.principal import operator_principal
from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest
from spe.db import Database


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the generated files here and keep them")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="spe-bench-") as tmp:
        work = Path(tmp)
        source = args.keep or work / "source"
        t0 = time.perf_counter()
        gen = generator.generate(source, args.persons, seed=args.seed, fmt=args.format,
                                 progress=True)
        gen_wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in source.iterdir())

        settings = Settings(data_dir=work / "var")
        db = Database(settings.resolved_database_url)
        db.upgrade()
        t0 = time.perf_counter()
        result = ingest(db, settings, "bench", source, operator_principal("bench"),
                        progress=True)
        ing_wall = time.perf_counter() - t0
        store_size = result.path.stat().st_size
        db.dispose()

    print(f"\npersons {args.persons:,}  format {args.format}  source {size / 1e6:,.0f} MB  "
          f"store {store_size / 1e6:,.0f} MB  cpus {os.cpu_count()}")
    header = (f"{'table':<22} {'rows':>12} {'gen s':>8} {'gen rows/s':>12} "
              f"{'ingest s':>9} {'ingest rows/s':>14}")
    print(header)
    print("-" * len(header))
    for table in generator.TABLES:
        rows = gen.rows[table]
        gs, is_ = gen.seconds[table], result.seconds.get(table, 0.0)
        print(f"{table:<22} {rows:>12,} {gs:>8.2f} {_rate(rows, gs):>12} "
              f"{is_:>9.2f} {_rate(rows, is_):>14}")
    print("-" * len(header))
    total = gen.total_rows
    print(f"{'total (wall)':<22} {total:>12,} {gen_wall:>8.2f} {_rate(total, gen_wall):>12} "
          f"{ing_wall:>9.2f} {_rate(total, ing_wall):>14}")


if __name__ == "__main__":
    main()
