"""Benchmark of the permit API: ``python -m bench.permits_api``.

Starts the SPE API with uvicorn in a subprocess on loopback (its own temporary data dir and
SQLite database, or ``--database-url``), validates tokens against the running Keycloak
(``SPE_KEYCLOAK_URL``, default the bundled one on port 8180), issues permits, then drives it
from a separate load-generating process (a minimal keep-alive HTTP/1.1 client, so the client
costs little CPU) with ``--concurrency`` connections:

* reads: ``GET /v1/permits/{id}`` with an access body's client-credentials token;
* writes: ``PATCH /v1/permits/{id}`` with ``If-Match`` (each connection amends its own
  permit, chaining the returned ETag: a new version, an audit entry and an event each).

With ``--background-load N`` the read phase runs again while N separate processes each run a
DuckDB aggregation (a mean by group over 5M generated rows, the kind of work a DP query hands
DuckDB) in a loop: a stand-in for DP queries competing for the CPU, not DP answers through
the API. The load generator runs in its own process on the same machine; its CPU is not
in "server CPU ms/req" (only the uvicorn processes' is).

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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

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

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"phase": kind, "requests": len(latencies), "seconds": round(elapsed, 2),
            "per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2),
            "errors": errors}


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

def background_main() -> None:
    """Run a DuckDB aggregation in a loop until killed (the ``--background-load`` stand-in)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 1")
    con.execute("CREATE TABLE m AS SELECT i % 1000 AS concept, random() AS v "
                "FROM range(5000000) t(i)")
    while True:
        con.execute("SELECT concept, avg(least(greatest(v, 0.1), 0.9)) FROM m "
                    "GROUP BY concept").fetchall()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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
        "ingest(db, s, 'bench', src, SYSTEM)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def _permit_body(i: int) -> dict[str, Any]:
    now = time.time()
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    return {
        "reference": f"BENCH-{i}-{int(now)}", "title": f"Bench project {i}",
        "holder": {"organisation": "Bench Institute", "principal_investigator": "Dr Bench"},
        "purposes": ["scientific_research"], "purpose_justification": "benchmark",
        "datasets": [{"dataset": "bench", "tables": {"person": ["person_id", "year_of_birth"]}}],
        "persons": ["alice"], "valid_from": iso(now - 86400), "valid_until": iso(now + 86400 * 30),
        "privacy_budget": {"epsilon": 5, "delta": 1e-6, "max_epsilon_per_query": 1},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--reads", type=int, default=20000, help="at most this many reads")
    ap.add_argument("--writes", type=int, default=2000, help="at most this many amends")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="per phase")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    ap.add_argument("--permits", type=int, default=32)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--background-load", type=int, default=0,
                    help="also measure reads while this many DuckDB aggregation loops run")
    ap.add_argument("--load-spec", help=argparse.SUPPRESS)
    ap.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.background:
        background_main()
        return
    if args.load_spec:
        load_main(args.load_spec)
        return

    keycloak = os.environ.get("SPE_KEYCLOAK_URL", "http://127.0.0.1:8180").rstrip("/")
    realm = os.environ.get("SPE_KEYCLOAK_REALM", "spe")
    client_id = os.environ.get("SPE_BENCH_CLIENT_ID", "hdab-alpha")
    secret = os.environ.get("SPE_BENCH_CLIENT_SECRET", f"{client_id}-dev-secret")
    with tempfile.TemporaryDirectory(prefix="spe-bench-") as tmp:
        data_dir = Path(tmp)
        port = _free_port()
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
                                    headers={"Idempotency-Key": f"bench-{i}"})
                    r.raise_for_status()
                    ids.append(r.json()["id"])
            spec = {"port": port, "token": token, "permit_ids": ids,
                    "concurrency": args.concurrency, "reads": args.reads,
                    "writes": args.writes, "max_seconds": args.max_seconds}
            spec_path = data_dir / "load.json"
            spec_path.write_text(json.dumps(spec))
            spec_path.chmod(0o600)
            results = []
            phases = ["read", "write"] + (["read+bg"] if args.background_load else [])
            loaders: list[subprocess.Popen[bytes]] = []
            for phase in phases:
                kind = phase.split("+")[0]
                spec_path.write_text(json.dumps({**spec, "reads": 0, "writes": 0,
                                                 f"{kind}s": spec[f"{kind}s"]}))
                if not spec[f"{kind}s"]:
                    continue
                if phase == "read+bg":
                    loaders = [subprocess.Popen([sys.executable, "-m", "bench.permits_api",
                                                 "--background"])
                               for _ in range(args.background_load)]
                    time.sleep(5)  # let each build its table and start querying
                cpu0 = _cpu_seconds(server.pid)
                out = subprocess.run([sys.executable, "-m", "bench.permits_api", "--load-spec",
                                      str(spec_path)], check=True, capture_output=True, text=True)
                result = json.loads(out.stdout)[0]
                cpu = _cpu_seconds(server.pid) - cpu0
                for loader in loaders:
                    loader.kill()
                    loader.wait(30)
                result["phase"] = phase
                result["server_cpu_ms"] = round(1000 * cpu / max(result["requests"], 1), 3)
                results.append(result)
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                for pid in ids:  # leave no Keycloak groups behind
                    client.post(f"/v1/permits/{pid}/revoke", json={"reason": "bench done"})
        finally:
            for loader in locals().get("loaders", []):
                loader.kill()
            server.terminate()
            server.wait(30)
    db_kind = "postgresql" if args.database_url else "sqlite"
    print(f"permit API on {HOST}, {args.workers} uvicorn worker(s), {db_kind}, "
          f"concurrency {args.concurrency}, {os.cpu_count()} CPUs")
    print(f"{'phase':<8} {'requests':>9} {'seconds':>8} {'req/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'server CPU ms/req':>18}  errors")
    for r in results:
        print(f"{r['phase']:<8} {r['requests']:>9} {r['seconds']:>8} {r['per_second']:>9} "
              f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['server_cpu_ms']:>18}  "
              f"{r['errors'] or '-'}")


if __name__ == "__main__":
    main()
