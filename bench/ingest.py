"""SPE ingest against DuckDB's own load of the same files, with each process's peak memory.

Run: ``python -m bench.ingest --persons 200000 [--format csv|parquet] [--repeat 3]
[--memory-sizes 100000 400000 [--memory-limit 512MB]] [--no-sorted] [--keep DIR]``.

Generates the dataset (CSV and Parquet by default, same seed: the same rows) into a temporary
directory (or ``--keep``). Then, per format, ``--repeat`` times, alternating, each in a fresh
child process (so its peak resident memory is its own):

* **raw DuckDB load**: a process that imports only ``duckdb`` and runs, for every table file,
  ``CREATE TABLE t AS SELECT * FROM read_csv(file, columns = the spec's types)`` (or
  ``read_parquet(file)``) into a fresh DuckDB file with the SPE's DuckDB settings (threads,
  memory limit, spill directory), then ``CHECKPOINT``: loading without any check;
* **SPE ingest**: a process that imports the SPE, creates and migrates a fresh control database
  and calls ``spe.datasets.ingest.ingest``, with every check it makes (header, types, required
  values, keys, date ranges, links, errors naming file/line/column, ranks and rank order,
  content hash, metadata, atomic registration with its audit event);
* **sorted load** (unless ``--no-sorted``): the raw load again, but every table the SPE stores
  in rank order gets a random small-integer column and is stored sorted by it: what that
  storage order alone costs DuckDB, with no rank computed and no check. Printed to explain
  the part of the ratio that the rank order (a contract of the DP engine) costs.

What is compared: **load s** is the raw process's timed load (connect to close) and **ingest s**
the SPE process's ``ingest()`` call; the bound (``<= 1.5x``) applies to their ratio. **CPU s**
are the CPU seconds (user + system, all threads) of the same two spans: less sensitive than
wall time to other work on a shared machine. What each process spends outside the timed span
(interpreter start, imports, for the SPE also creating and migrating its control database, and
exit) is printed separately as **start-up s**; the **process ratio** (process wall against
process wall) includes it. Each number is the median of ``--repeat`` runs; the spread (min-max)
of the per-run ratios follows the ratio. **peak RSS** is each process's peak resident memory
(its ``VmHWM``, median).

``--memory-sizes A B``: additionally one raw and one SPE run per format at each of these person
counts, printing peak RSS against the source size (does memory grow with the file?), and
``--memory-limit 512MB`` each of them again under that DuckDB memory limit on both sides
(the peak it keeps and the time the spilling sort costs). Its note says why ingest memory
does not stream.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOUND = 1.5
FORMATS = ("csv", "parquet")


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# Children ---------------------------------------------------------------------------------


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far, all its threads."""
    t = os.times()
    return t.user + t.system


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: since its exec, all threads).

    Not the parent's ``wait4`` ``ru_maxrss``: Linux folds the forking parent's high-water mark
    into the child's at exec, so a child of a large parent reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _raw_child(plan: dict[str, Any], work: Path, sort: bool) -> dict[str, Any]:
    """DuckDB's own load of every file in ``plan`` (no checks); imports nothing of the SPE.

    ``sort``: the tables the SPE stores in rank order get a random small-integer column and
    are stored sorted by it (what storing in rank order costs DuckDB, without computing ranks
    or any check)."""
    import duckdb

    started, cpu = time.perf_counter(), _cpu()
    con = duckdb.connect(str(work / "raw.duckdb"))
    con.execute(f"SET threads = {int(plan['threads'])}")
    con.execute(f"SET memory_limit = {_lit(plan['memory_limit'])}")
    con.execute(f"SET temp_directory = {_lit(str(work / 'raw.spill'))}")
    seconds: dict[str, float] = {}
    for f in plan["files"]:
        t0 = time.perf_counter()
        if f["kind"] == "parquet":
            src = f"read_parquet({_lit(f['path'])})"
        else:
            cols = "{" + ", ".join(f"{_lit(c)}: {_lit(t)}" for c, t in f["columns"]) + "}"
            src = (f"read_csv({_lit(f['path'])}, header=true, auto_detect=false, "
                   f"delim={_lit(f['delimiter'])}, quote='\"', escape='\"', columns={cols})")
        if sort and f["ordered"]:
            con.execute(f'CREATE TABLE "{f["table"]}" AS SELECT *, CAST(floor(random() * 16) '
                        f'AS INTEGER) AS _k FROM {src} ORDER BY _k')
        else:
            con.execute(f'CREATE TABLE "{f["table"]}" AS SELECT * FROM {src}')
        seconds[f["table"]] = time.perf_counter() - t0
    con.execute("CHECKPOINT")
    con.close()
    return {"work": time.perf_counter() - started, "cpu": _cpu() - cpu, "tables": seconds,
            "rss": _peak_rss()}


def _spe_child(source: Path, work: Path) -> dict[str, Any]:
    """The SPE's ingest of ``source``; start-up (imports, control database) is not timed."""
    from spe.auth.principal import operator_principal
    from spe.config import Settings
    from spe.datasets.ingest import ingest
    from spe.db import Database

    settings = Settings(data_dir=work / "var")
    db = Database(settings.resolved_database_url)
    db.upgrade()
    principal = operator_principal("bench")
    started, cpu = time.perf_counter(), _cpu()
    result = ingest(db, settings, "bench", source, principal)
    elapsed, cpu = time.perf_counter() - started, _cpu() - cpu
    db.dispose()
    return {"work": elapsed, "cpu": cpu, "tables": result.seconds, "rss": _peak_rss()}


# Parent -----------------------------------------------------------------------------------


@dataclass
class Run:
    """One child process: timed work (wall and CPU seconds, all threads), process wall, peak
    RSS, seconds per table."""

    work: float
    wall: float
    cpu: float
    rss: int
    tables: dict[str, float] = field(default_factory=dict)

    @property
    def startup(self) -> float:
        return self.wall - self.work


def _child(args: list[str]) -> Run:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.ingest", *args],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    status = proc.wait()
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"bench child {args[:2]} failed (status {status})")
    data = json.loads(out)
    return Run(data["work"], wall, data["cpu"], data["rss"], data["tables"])


def _plan(source: Path) -> dict[str, Any]:
    """The files as the SPE finds them, with the spec's types, for the raw child."""
    from spe.config import Settings
    from spe.datasets import defaults
    from spe.datasets.ingest import discover
    from spe.datasets.omop_spec import load_spec

    settings = Settings()
    specs = load_spec()
    decl, _path = defaults.load_declaration(source, specs)
    files = []
    for sf in discover(source):
        spec = specs[sf.table]
        types = spec.duckdb_columns()
        unit = defaults.person_column(defaults.table_kind(spec, decl)[0])
        files.append({"table": sf.table, "path": str(sf.path), "kind": sf.kind,
                      "delimiter": sf.delimiter or ",",
                      "columns": [(c, types[c]) for c in sf.columns],
                      "ordered": unit is not None and spec.primary_key != [unit]})
    return {"threads": settings.duckdb_threads, "memory_limit": settings.duckdb_memory_limit,
            "files": files}


@dataclass
class Trio:
    """One alternation: raw load, SPE ingest and (optionally) raw load sorted like the SPE."""

    raw: Run
    spe: Run
    sorted: Run | None


def _trio(source: Path, work: Path, index: int, sort: bool) -> Trio:
    plan = work / "plan.json"
    if not plan.exists():
        plan.write_text(json.dumps(_plan(source)))
    dirs = [work / f"{kind}{index}" for kind in ("raw", "spe", "sorted")]
    for d in dirs:
        d.mkdir()
    raw = _child(["--child", "raw", "--source", str(plan), "--work", str(dirs[0])])
    spe = _child(["--child", "spe", "--source", str(source), "--work", str(dirs[1])])
    srt = _child(["--child", "sorted", "--source", str(plan), "--work", str(dirs[2])]) \
        if sort else None
    for d in dirs:  # keep the disk free for the next run
        subprocess.run(["rm", "-rf", str(d)], check=True)
    return Trio(raw, spe, srt)


MEMORY_NOTE = (
    "note: ingest memory does not stream. Every per-person table is stored sorted by its row "
    "rank (the DP engine's truncation reads only the row groups with rank <= k), and a sort "
    "holds its input: DuckDB keeps it in memory up to its memory limit "
    "(SPE_DUCKDB_MEMORY_LIMIT) and spills past it. A limit low enough to keep the peak flat "
    "makes the sort spill (see --memory-limit: the ratio column), so a flat peak and the "
    "1.5x time bound cannot both hold on this machine.")


def _with_memory_limit(limit: str, source: Path, work: Path) -> Trio:
    """One raw load and one SPE ingest with SPE_DUCKDB_MEMORY_LIMIT set to ``limit`` (both
    sides read it)."""
    before = os.environ.get("SPE_DUCKDB_MEMORY_LIMIT")
    os.environ["SPE_DUCKDB_MEMORY_LIMIT"] = limit
    try:
        return _trio(source, work, 0, False)
    finally:
        if before is None:
            del os.environ["SPE_DUCKDB_MEMORY_LIMIT"]
        else:
            os.environ["SPE_DUCKDB_MEMORY_LIMIT"] = before


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _size_mb(source: Path) -> float:
    return sum(p.stat().st_size for p in source.iterdir()
               if p.suffix in (".csv", ".parquet")) / 1e6


def _generate(root: Path, persons: int, seed: int, fmt: str) -> tuple[Path, Any, float]:
    from spe.datasets import generator

    source = root / f"{fmt}-{persons}"
    t0 = time.perf_counter()
    gen = generator.generate(source, persons, seed=seed, fmt=fmt,  # type: ignore[arg-type]
                             progress=True)
    return source, gen, time.perf_counter() - t0


Results = dict[str, tuple[float, list[Trio]]]


def _main_tables(results: Results) -> list[str]:
    header = (f"{'format':<8} {'source MB':>9} {'load s':>7} {'ingest s':>8} {'ratio':>6} "
              f"{'spread':>11} {'bound':>12} {'CPU s load/ingest':>18} {'CPU ratio':>9}")
    lines = [header, "-" * len(header)]
    notes = []
    for fmt, (size, runs) in results.items():
        ratios = [t.spe.work / t.raw.work for t in runs]
        load = _median([t.raw.work for t in runs])
        ing = _median([t.spe.work for t in runs])
        ratio = _median(ratios)
        ok = ratio <= BOUND
        verdict = f"<={BOUND}x " + ("ok" if ok else "MISS")
        cpu_raw = _median([t.raw.cpu for t in runs])
        cpu_spe = _median([t.spe.cpu for t in runs])
        cpu_ratio = _median([t.spe.cpu / t.raw.cpu for t in runs])
        lines.append(
            f"{fmt:<8} {size:>9,.0f} {load:>7.2f} {ing:>8.2f} {ratio:>5.2f}x "
            f"{min(ratios):>5.2f}-{max(ratios):.2f}x {verdict:>12} "
            f"{cpu_raw:>8.2f} / {cpu_spe:<7.2f} {cpu_ratio:>8.2f}x")
        if not ok:
            runs_text = ", ".join(f"{x:.2f}x" for x in ratios)
            note = (f"note: {fmt} misses the {BOUND}x bound: ingest {ing:.2f} s against "
                    f"DuckDB's load {load:.2f} s (runs {runs_text})")
            sorted_runs = [t.sorted for t in runs if t.sorted is not None]
            if sorted_runs:
                srt = _median([r.work for r in sorted_runs])
                note += (f"; DuckDB's own load storing the per-person tables sorted, as the SPE "
                         f"stores them in rank order, takes {srt:.2f} s ({srt / load:.2f}x its "
                         f"plain load) before any rank, check or metadata")
            notes.append(note)
    header2 = (f"{'format':<8} {'sorted load s':>13} {'ingest/sorted':>13} "
               f"{'start-up s raw/SPE':>19} {'process s raw/SPE':>18} {'process ratio':>13} "
               f"{'peak RSS MB raw/SPE':>20}")
    lines += ["", header2, "-" * len(header2)]
    for fmt, (_size, runs) in results.items():
        sorted_runs = [t.sorted for t in runs if t.sorted is not None]
        srt = _median([r.work for r in sorted_runs]) if sorted_runs else float("nan")
        ing_srt = _median([t.spe.work / t.sorted.work for t in runs if t.sorted is not None]) \
            if sorted_runs else float("nan")
        lines.append(
            f"{fmt:<8} {srt:>13.2f} {ing_srt:>12.2f}x "
            f"{_median([t.raw.startup for t in runs]):>10.2f} / "
            f"{_median([t.spe.startup for t in runs]):<6.2f} "
            f"{_median([t.raw.wall for t in runs]):>9.2f} / "
            f"{_median([t.spe.wall for t in runs]):<6.2f} "
            f"{_median([t.spe.wall / t.raw.wall for t in runs]):>12.2f}x "
            f"{_median([t.raw.rss for t in runs]) / 2**20:>9,.0f} / "
            f"{_median([t.spe.rss for t in runs]) / 2**20:<8,.0f}")
    return lines + (["", *notes] if notes else [])


def _table_lines(rows: dict[str, int], results: Results) -> list[str]:
    header = f"{'table':<21} {'rows':>10}" + "".join(
        f" {fmt + ' load':>13} {fmt + ' ingest':>15} {'ratio':>6}" for fmt in results)
    lines = [header, "-" * len(header)]
    for table, n in rows.items():
        line = f"{table:<21} {n:>10,}"
        for _fmt, (_size, runs) in results.items():
            r = _median([t.raw.tables.get(table, 0.0) for t in runs])
            s = _median([t.spe.tables.get(table, 0.0) for t in runs])
            ratio = f"{s / r:.2f}x" if r > 0.005 else "-"
            line += f" {r:>13.2f} {s:>15.2f} {ratio:>6}"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--persons", type=int, default=200_000)
    parser.add_argument("--format", choices=[*FORMATS, "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per side and format (alternating; medians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[],
                        help="also one run per side at each of these person counts: peak RSS")
    parser.add_argument("--memory-limit", default=None,
                        help="with --memory-sizes: run each size again with this DuckDB memory "
                        "limit on both sides (e.g. 512MB): the peak and the time the sort's "
                        "spilling costs")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the generated files under this directory and keep them")
    parser.add_argument("--no-sorted", action="store_true",
                        help="skip the third process per run (DuckDB's load, sorted)")
    parser.add_argument("--child", choices=["raw", "sorted", "spe"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child in ("raw", "sorted"):
        print(json.dumps(_raw_child(json.loads(args.source.read_text()), args.work,
                                    sort=args.child == "sorted")))
        return
    if args.child == "spe":
        print(json.dumps(_spe_child(args.source, args.work)))
        return

    formats = FORMATS if args.format == "both" else (args.format,)
    with tempfile.TemporaryDirectory(prefix="spe-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        results: Results = {}
        rows: dict[str, int] = {}
        gen_note = []
        for fmt in formats:
            source, gen, gen_s = _generate(root, args.persons, args.seed, fmt)
            rows = dict(gen.rows)
            gen_note.append(f"{fmt} generated in {gen_s:.1f} s")
            work = Path(tmp) / f"work-{fmt}"
            work.mkdir()
            runs = [_trio(source, work, i, not args.no_sorted) for i in range(args.repeat)]
            results[fmt] = (_size_mb(source), runs)
        memory: list[str] = []
        from spe.config import Settings

        limits = [Settings().duckdb_memory_limit]
        if args.memory_limit:
            limits.append(args.memory_limit)
        for persons in args.memory_sizes:
            for fmt in formats:
                source, _gen, _s = _generate(root, persons, args.seed, fmt)
                for n, limit in enumerate(limits):
                    work = Path(tmp) / f"mem-{fmt}-{persons}-{n}"
                    work.mkdir()
                    trio = _with_memory_limit(limit, source, work)
                    memory.append(f"{persons:>10,} {fmt:<8} {_size_mb(source):>9,.0f} "
                                  f"{limit:>8} {trio.raw.rss / 2**20:>12,.0f} "
                                  f"{trio.spe.rss / 2**20:>12,.0f} "
                                  f"{trio.spe.work / trio.raw.work:>6.2f}x")
                subprocess.run(["rm", "-rf", str(source)], check=False)

    total = sum(rows.values())
    print(f"\ningest: {args.persons:,} persons, {len(rows)} tables, {total:,} rows; "
          f"{os.cpu_count()} CPUs; {args.repeat} alternating fresh processes per side "
          f"(medians; {'; '.join(gen_note)})")
    print("load s: raw DuckDB process, connect..close; ingest s: SPE ingest() call (CPU s: "
          "the same spans, all threads); start-up s: the rest of each process's wall "
          "(interpreter, imports, the SPE's control DB and migrations, exit)")
    for line in _main_tables(results):
        print(line)
    print()
    for line in _table_lines(rows, results):
        print(line)
    if memory:
        print(f"\npeak RSS by size (one run each; ratio: ingest s / load s)\n"
              f"{'persons':>10} {'format':<8} {'source MB':>9} {'limit':>8} "
              f"{'raw RSS MB':>12} {'SPE RSS MB':>12} {'ratio':>7}")
        for line in memory:
            print(line)
        print(MEMORY_NOTE)


if __name__ == "__main__":
    main()
