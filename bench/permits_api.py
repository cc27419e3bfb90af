"""Benchmark of the permit API: ``python -m bench.permits_api``.

Starts the SPE API with uvicorn in a subprocess on loopback (its own temporary data dir and
SQLite database, or ``--database-url``), validates tokens against the running Keycloak
(``SPE_KEYCLOAK_URL``, default the bundled one on port 8180), issues permits, then drives it
from a separate load-generating process (a minimal keep-alive HTTP/1.1 client, so the client
costs little CPU) with ``--concurrency`` connections:

* reads: ``GET /v1/permits/{id}`` with an access body's client-credentials token;
* writes: ``PATCH /v1/permits/{id}`` with ``If-Match`` (each connection amends its own
  permit, chaining the returned ETag: a new version, an audit entry and an event each).

With ``--background-load N`` the read phase runs again (``read+dp``) while N separate
processes each run real DP queries in a loop: ``bench.dp_query``'s queries through the DP
engine (plan, truncation, OpenDP noise) over its generated dataset (``--dp-persons``, 10
measurement rows each), on DuckDB connections with the SPE's own settings
(``duckdb_threads``, ``duckdb_memory_limit`` from ``Settings``, as the server reads them).
The load generator runs in its own process on the same machine.

The server runs ``--workers`` uvicorn processes (default 1: ``spe up`` serves the API from
one uvicorn process; an operator who runs ``uvicorn spe.api.app:create_app --factory
--workers N`` behind a proxy passes N here). Every CPU second of each phase's window is
accounted for: the server's (per read), the load generator's (per read), PostgreSQL's (per
read, when it runs on this machine), the DP loops' and every other process's on the machine
(``/proc/stat``). A read phase under ``--target``
(1,000 reads/s, issue 17) prints a note with the ceiling those numbers give: the cores the
DP queries and other processes left, divided by the CPU one read costs (server plus load
generator).

Each phase is bounded in requests and in seconds. Prints throughput and p50/p99 latency.
The access body's client secret comes from ``SPE_BENCH_CLIENT_SECRET`` (default: the
development realm's demo secret).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.ports import free_port

HOST = "127.0.0.1"


# Load generator (runs in its own process) ---------------------------------------------------

async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
                   path: str, headers: dict[str, str], body: bytes = b""
                   ) -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            parsed[k.strip().lower()] = v.strip()
    payload = await reader.readexactly(int(parsed.get("content-length", "0")))
    return int(status_line.split(" ", 2)[1]), parsed, payload


async def _phase(kind: str, port: int, token: str, permit_ids: list[str], concurrency: int,
                 max_requests: int, max_seconds: float) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    errors: dict[int, int] = {}
    deadline = time.perf_counter() + max_seconds
    issued = 0

    async def worker(i: int) -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection(HOST, port)
        own = permit_ids[i % len(permit_ids)]
        etag = ""
        if kind == "write":
            _, headers, _ = await _request(reader, writer, "GET", f"/v1/permits/{own}", auth)
            etag = headers["etag"]
        rng = random.Random(i)
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                started = time.perf_counter()
                if kind == "read":
                    status, _, _ = await _request(
                        reader, writer, "GET", f"/v1/permits/{rng.choice(permit_ids)}", auth)
                else:
                    body = json.dumps({"title": f"bench {i} {issued}"}).encode()
                    status, headers, _ = await _request(
                        reader, writer, "PATCH", f"/v1/permits/{own}",
                        {**auth, "If-Match": etag}, body)
                    etag = headers.get("etag", etag)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors[status] = errors.get(status, 0) + 1
        finally:
            writer.close()

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"phase": kind, "requests": len(latencies), "seconds": round(elapsed, 2),
            "per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2),
            "errors": errors, "client_cpu_s": cpu}


def load_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = []
    for kind, count in (("read", spec["reads"]), ("write", spec["writes"])):
        if count:
            results.append(asyncio.run(_phase(kind, spec["port"], spec["token"],
                                              spec["permit_ids"], spec["concurrency"], count,
                                              spec["max_seconds"])))
    print(json.dumps(results))


# Orchestration ------------------------------------------------------------------------------

def background_main(persons: int) -> None:
    """Run real DP queries in a loop until SIGTERM, then print one JSON line.

    The DP engine as the DP API runs it (:func:`spe.dp.runner.prepare` then
    :func:`spe.dp.engine.execute`) over ``bench.dp_query``'s generated dataset of ``persons``
    persons (cached there), each query of ``bench.dp_query.QUERIES`` in turn, on a DuckDB
    connection opened with the SPE's own settings (``Settings()``: ``duckdb_threads``,
    ``duckdb_memory_limit``, the query timeout, from the environment as the server reads
    them). Prints ``{"queries": n, "seconds": s}`` when stopped.
    """
    import signal

    from bench import dp_query
    from spe.config import Settings
    from spe.dp import duck
    from spe.dp.engine import execute
    from spe.dp.runner import prepare
    from spe.dp.testing import make_terms

    path, meta, _ = dp_query.dataset(dp_query.BENCH_DIR, persons, 10, parquet=False)
    settings = Settings()
    con = duck.connect(path, settings)
    terms = make_terms(meta, epsilon=1e9, max_epsilon_per_query=10)
    queries = [sql for _, _, sql in dp_query.QUERIES if sql is not None]
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    print(json.dumps({"ready": True}), flush=True)
    done, t0 = 0, time.perf_counter()
    while not stop:
        # Planned per query, as the DP API does.
        prep = prepare(queries[done % len(queries)], meta, terms, epsilon=1.0, delta=1e-6)
        execute(prep.plan, prep.cost.units, con, settings)
        done += 1
    print(json.dumps({"queries": done, "seconds": time.perf_counter() - t0}), flush=True)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the API server exited at start")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the API server did not become ready")


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of process ``pid`` and its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo += [int(c) for c in children]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _client_token(keycloak: str, realm: str, client_id: str, secret: str) -> str:
    r = httpx.post(f"{keycloak}/realms/{realm}/protocol/openid-connect/token", timeout=30,
                   data={"grant_type": "client_credentials", "client_id": client_id,
                         "client_secret": secret})
    r.raise_for_status()
    return str(r.json()["access_token"])


#: The dataset the benchmark's permits name: unique per run, so a run against a PostgreSQL
#: database that earlier runs used (the schema persists there) registers its own.
DATASET = f"bench_{os.getpid()}_{int(time.time())}"


def _prepare(data_dir: Path, env: dict[str, str]) -> None:
    """Create the schema and register a tiny generated dataset (real ingest)."""
    code = (
        "from pathlib import Path\n"
        "from spe.config import Settings\n"
        "from spe.db import Database\n"
        "from spe.auth.principal import SYSTEM\n"
        "from spe.datasets import generator\n"
        "from spe.datasets.ingest import ingest\n"
        "s = Settings()\n"
        "db = Database(s.resolved_database_url); db.upgrade()\n"
        f"src = Path({str(data_dir / 'src')!r}); generator.generate(src, 20, seed=1)\n"
        f"ingest(db, s, {DATASET!r}, src, SYSTEM)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def _permit_body(i: int) -> dict[str, Any]:
    now = time.time()
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    return {
        "reference": f"BENCH-{i}-{int(now)}", "title": f"Bench project {i}",
        "holder": {"organisation": "Bench Institute", "principal_investigator": "Dr Bench"},
        "purposes": ["scientific_research"], "purpose_justification": "benchmark",
        "datasets": [{"dataset": DATASET, "tables": {"person": ["person_id", "year_of_birth"]}}],
        "persons": ["alice"], "valid_from": iso(now - 86400), "valid_until": iso(now + 86400 * 30),
        "privacy_budget": {"epsilon": 5, "delta": 1e-6, "max_epsilon_per_query": 1},
    }


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (Linux ``/proc/stat``, every process)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL process on this machine (0 when none runs here)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "postgres":
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


def _children() -> float:
    """CPU seconds of this process's waited-for children (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _start_dp_load(count: int, persons: int) -> list[subprocess.Popen[str]]:
    """Start ``count`` DP query loops (see :func:`background_main`); return once all run."""
    from bench import dp_query

    dp_query.dataset(dp_query.BENCH_DIR, persons, 10, parquet=False)  # generate once, here
    loaders = [subprocess.Popen([sys.executable, "-m", "bench.permits_api", "--background",
                                 "--dp-persons", str(persons)],
                                stdout=subprocess.PIPE, text=True) for _ in range(count)]
    for loader in loaders:
        assert loader.stdout is not None
        if "ready" not in loader.stdout.readline():
            raise SystemExit("a DP load process failed to start")
    time.sleep(2)  # past the first queries (DuckDB's first reads of the file)
    return loaders


def _stop_dp_load(loaders: list[subprocess.Popen[str]]) -> int:
    """Stop the loops; the number of DP queries they answered."""
    done = 0
    for loader in loaders:
        loader.terminate()
        out, _ = loader.communicate(timeout=120)
        lines = out.strip().splitlines()
        done += int(json.loads(lines[-1])["queries"]) if lines else 0
    return done


def cpu_note(r: dict[str, Any], cores: int, target: float) -> str | None:
    """Why a phase stayed under ``target`` reads/s, from its CPU measurements (or None).

    Every read costs ``server_cpu_ms`` in the server, ``client_cpu_ms`` in the load
    generator and ``db_cpu_ms`` in PostgreSQL's processes (when it runs here), all on this
    machine's ``cores``; the DP queries (``dp_cores``) and any other
    process (``other_cores``) used the rest. The ceiling is what the cores left over would
    serve if every cycle went to reads.
    """
    if r["per_second"] >= target:
        return None
    per_read = r["server_cpu_ms"] + r["client_cpu_ms"] + r["db_cpu_ms"]
    left = max(cores - r.get("dp_cores", 0.0) - r["other_cores"], 0.0)
    ceiling = left * 1000 / per_read if per_read else float("inf")
    dp = f"the DP queries used {r['dp_cores']:.2f}, " if "dp_cores" in r else ""
    db = f" + {r['db_cpu_ms']:.3f} ms in PostgreSQL" if r["db_cpu_ms"] else ""
    verdict = ("out of reach on what was left" if ceiling < target
               else "CPU was left over: bound by scheduling, not by CPU")
    return (f"{r['phase']}: {r['per_second']:,.0f} reads/s < {target:,.0f}: of {cores} cores "
            f"{dp}other processes {r['other_cores']:.2f}; a read costs "
            f"{r['server_cpu_ms']:.3f} ms of server CPU + {r['client_cpu_ms']:.3f} ms in the "
            f"load generator{db}, so the {left:.2f} cores left serve at most {ceiling:,.0f} "
            f"reads/s ({verdict})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--reads", type=int, default=20000, help="at most this many reads")
    ap.add_argument("--writes", type=int, default=2000, help="at most this many amends")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="per phase")
    ap.add_argument("--workers", type=int, default=1,
                    help="uvicorn worker processes (default 1: what `spe up` runs)")
    ap.add_argument("--permits", type=int, default=32)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--background-load", type=int, default=0,
                    help="also measure reads while this many processes run DP queries")
    ap.add_argument("--dp-persons", type=int, default=1_000_000,
                    help="persons in the DP load's generated dataset (10 rows each)")
    ap.add_argument("--target", type=float, default=1000.0,
                    help="reads/s bound (issue 17); a phase under it gets a CPU note")
    ap.add_argument("--load-spec", help=argparse.SUPPRESS)
    ap.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.background:
        background_main(args.dp_persons)
        return
    if args.load_spec:
        load_main(args.load_spec)
        return

    keycloak = os.environ.get("SPE_KEYCLOAK_URL", "http://127.0.0.1:8180").rstrip("/")
    realm = os.environ.get("SPE_KEYCLOAK_REALM", "spe")
    client_id = os.environ.get("SPE_BENCH_CLIENT_ID", "hdab-alpha")
    secret = os.environ.get("SPE_BENCH_CLIENT_SECRET", f"{client_id}-dev-secret")
    loaders: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="spe-bench-") as tmp:
        data_dir = Path(tmp)
        port = free_port()
        env = {**os.environ, "SPE_DATA_DIR": str(data_dir / "var"),
               "SPE_KEYCLOAK_URL": keycloak, "SPE_KEYCLOAK_REALM": realm,
               "SPE_LOG_LEVEL": "WARNING"}
        if args.database_url:
            env["SPE_DATABASE_URL"] = args.database_url
        _prepare(data_dir, env)
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "spe.api.app:create_app", "--factory",
             "--host", HOST, "--port", str(port), "--workers", str(args.workers),
             "--log-level", "warning", "--no-access-log"], env=env)
        try:
            base = f"http://{HOST}:{port}"
            _wait_ready(base, server)
            token = _client_token(keycloak, realm, client_id, secret)
            headers = {"Authorization": f"Bearer {token}"}
            ids = []
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                for i in range(args.permits):
                    r = client.post("/v1/permits", json=_permit_body(i),
                                    headers={"Idempotency-Key": f"{DATASET}-{i}"})
                    r.raise_for_status()
                    ids.append(r.json()["id"])
            spec = {"port": port, "token": token, "permit_ids": ids,
                    "concurrency": args.concurrency, "reads": args.reads,
                    "writes": args.writes, "max_seconds": args.max_seconds}
            spec_path = data_dir / "load.json"
            spec_path.write_text(json.dumps(spec))
            spec_path.chmod(0o600)
            results = []
            phases = ["read"] + (["read+dp"] if args.background_load else []) + ["write"]
            for phase in phases:
                kind = phase.split("+")[0]
                spec_path.write_text(json.dumps({**spec, "reads": 0, "writes": 0,
                                                 f"{kind}s": spec[f"{kind}s"]}))
                if not spec[f"{kind}s"]:
                    continue
                if phase == "read+dp":
                    loaders = _start_dp_load(args.background_load, args.dp_persons)
                cpu0 = _cpu_seconds(server.pid)
                dp0 = sum(_cpu_seconds(p.pid) for p in loaders)
                busy0, wall0, child0 = _machine_busy_seconds(), time.perf_counter(), _children()
                pg0 = _postgres_cpu_seconds() if args.database_url else 0.0
                out = subprocess.run([sys.executable, "-m", "bench.permits_api", "--load-spec",
                                      str(spec_path)], check=True, capture_output=True, text=True)
                # The window is the load generator's whole life (its start-up included), so
                # every CPU second in it is the server's, the generator's, the DP load's or
                # another process's.
                busy, wall = _machine_busy_seconds() - busy0, time.perf_counter() - wall0
                cpu = _cpu_seconds(server.pid) - cpu0
                pg = _postgres_cpu_seconds() - pg0 if args.database_url else 0.0
                other = busy - cpu - pg - (_children() - child0)
                result = json.loads(out.stdout)[0]
                n = max(result["requests"], 1)
                if loaders:
                    dp_cpu = sum(_cpu_seconds(p.pid) for p in loaders) - dp0
                    result["dp_queries"] = _stop_dp_load(loaders)
                    loaders = []
                    result["dp_cores"] = dp_cpu / wall
                    other -= dp_cpu
                result["phase"] = phase
                result["server_cpu_ms"] = round(1000 * cpu / n, 3)
                result["client_cpu_ms"] = round(1000 * result["client_cpu_s"] / n, 3)
                result["db_cpu_ms"] = round(1000 * pg / n, 3)
                result["other_cores"] = max(other, 0.0) / wall
                results.append(result)
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                for pid in ids:  # leave no Keycloak groups behind
                    client.post(f"/v1/permits/{pid}/revoke", json={"reason": "bench done"})
        finally:
            for loader in loaders:
                loader.kill()
            server.terminate()
            server.wait(30)
    report(results, args)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the table and, for a read phase under ``--target``, the CPU note."""
    db_kind = "postgresql" if args.database_url else "sqlite"
    cores = os.cpu_count() or 1
    print(f"permit API on {HOST}, {args.workers} uvicorn worker(s), {db_kind}, "
          f"concurrency {args.concurrency}, {cores} CPUs (server, load generator and DP "
          "queries share them)")
    print(f"{'phase':<8} {'requests':>9} {'seconds':>8} {'req/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'server CPU ms/req':>18} {'client CPU ms/req':>18} "
          f"{'DB CPU ms/req':>14} "
          f"{'DP q/s':>7} {'DP cores':>8}  errors")
    for r in results:
        dp_q = f"{r['dp_queries'] / r['seconds']:.1f}" if "dp_queries" in r else "-"
        dp_c = f"{r['dp_cores']:.2f}" if "dp_cores" in r else "-"
        print(f"{r['phase']:<8} {r['requests']:>9} {r['seconds']:>8} {r['per_second']:>9} "
              f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['server_cpu_ms']:>18} "
              f"{r['client_cpu_ms']:>18} {r['db_cpu_ms'] or '-':>14} {dp_q:>7} {dp_c:>8}  "
              f"{r['errors'] or '-'}")
    if args.background_load:
        print(f"read+dp: {args.background_load} process(es) looping bench.dp_query's queries "
              f"through the DP engine ({args.dp_persons:,} persons x 10 rows, the SPE's DuckDB "
              "settings)")
    for r in results:
        note = cpu_note(r, cores, args.target) if r["phase"].startswith("read") else None
        if note:
            print("note: " + note)


if __name__ == "__main__":
    main()
