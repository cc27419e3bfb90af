"""Airlock check time against reading the same file with DuckDB alone.

Run: ``python -m bench.airlock [--mb 100] [--rows 10000]``. Writes two CSV files into a
temporary directory: an aggregate-shaped table of about ``--mb`` MB (group columns, a count and
a mean) and a ``--rows``-row table of the same shape, then times for each:

* **DuckDB read**: ``SELECT * FROM read_csv(file)`` fetched as Arrow (parse everything, no check);
* **airlock checks**: reading the file and ``spe.airlock.checks.check_file`` on its bytes and
  path, as the service calls it (SHA-256, kind from content, a full table parse by DuckDB,
  identifiers, encoded cells, cell counts, zeros, differencing against one released table),
  with the row limit lifted so every check runs.

Each runs in a fresh process (spawned, so nothing is shared) and reports its peak resident set
size (``ru_maxrss``, the interpreter and its imports included); an empty process with the same
imports is printed as the floor. Prints seconds of each, their ratio and the peaks; the goal is
under 5 s and at most 2x the plain read.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd

from spe.airlock.checks import Context, ReleasedTable, check_file


def _write(path: Path, rows: int, seed: int) -> None:
    rnd = random.Random(seed)
    regions = [f"region_{i:03d}" for i in range(200)]
    with path.open("w") as fh:
        fh.write("region,year,sex,age_band,n,mean_value\n")
        for i in range(rows):
            fh.write(f"{regions[i % 200]},{2000 + (i // 200) % 25},{'FM'[i % 2]},"
                     f"{(i // 5000) % 18 * 5}-{(i // 5000) % 18 * 5 + 4},"
                     f"{rnd.randint(10, 5000)},{rnd.random() * 100:.4f}\n")


def _duckdb(path: Path) -> float:
    import duckdb

    start = time.perf_counter()
    con = duckdb.connect()
    con.sql(f"SELECT * FROM read_csv('{path}')").to_arrow_table()
    con.close()
    return time.perf_counter() - start


def _checks(path: Path) -> tuple[float, str]:
    released = ReleasedTable("r0", "f0", pd.DataFrame({
        "region": ["region_000"], "year": [2000], "sex": ["F"], "age_band": ["0-4"],
        "n": [100], "mean_value": [1.0]}))
    ctx = Context(permit_id="bench", secret="bench-secret-bench-secret-bench-secret",
                  allowed_kinds=frozenset({"csv"}), max_rows=10**9,
                  released_tables=[released])
    start = time.perf_counter()
    data = path.read_bytes()
    verdict = check_file(data, ctx, path)  # the service passes the quarantine file too
    return time.perf_counter() - start, verdict.outcome


def _measure(what: str, path: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """In a fresh process: run one measurement, put (seconds, outcome, peak RSS in MB)."""
    took, outcome = 0.0, ""
    if what == "duckdb":
        took = _duckdb(Path(path))
    elif what == "checks":
        took, outcome = _checks(Path(path))
    out.put((took, outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _isolated(what: str, path: Path) -> tuple[float, str, float]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(what, str(path), out))
    proc.start()
    result = out.get()
    proc.join()
    return result  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small.csv", Path(tmp) / "big.csv"
        _write(small, args.rows, 1)
        per_row = small.stat().st_size / args.rows
        _write(big, int(args.mb * 1_000_000 / per_row), 2)
        floor = _isolated("nothing", small)[2]
        print(f"peak RSS of a process with the imports and nothing run: {floor:.0f} MB")
        print(f"{'file':<24}{'MB':>8}{'DuckDB s':>10}{'checks s':>10}{'ratio':>8}"
              f"{'DuckDB RSS MB':>15}{'checks RSS MB':>15}  outcome")
        for name, path in ((f"{args.rows}-row table", small), (f"{args.mb:g} MB CSV", big)):
            raw, _, raw_rss = _isolated("duckdb", path)
            took, outcome, rss = _isolated("checks", path)
            print(f"{name:<24}{path.stat().st_size / 1e6:>8.1f}{raw:>10.3f}{took:>10.3f}"
                  f"{took / raw:>8.2f}{raw_rss:>15.0f}{rss:>15.0f}  {outcome}")


if __name__ == "__main__":
    main()
