"""Spawn benchmark: ``.venv/bin/python -m bench.spawn [--spawns N]`` (as root).

Measures, in one run and on the same machine, JupyterHub 6 with configurable-http-proxy and
two spawners serving the same single-user server from the workspace runtime (var/runtime):

* ``SandboxSpawner``: the SPE's sandbox (account, cgroup, network namespace + nftables,
  bubblewrap, workspace token, permit check) for a permit naming the bench user;
* stock ``LocalProcessSpawner`` for a temporary system user.

For each: spawn-to-ready (POST the named server on the hub API until the hub reports it ready;
p50/p95 over N spawns) and kernel start (POST /api/kernels on the server through the proxy
until the kernel answers an execute request over the websocket channels). Authentication is
JupyterHub's null authenticator with a service token (login is not what is measured).
Everything made (hubs, users, workspaces, temporary files) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from tests.e2e.stack import run_code
from tests.ports import free_port
from workspaces.hub import REPO, HubProcess, start_hub

CONFIG = '''
import os
from pathlib import Path
c = get_config()  # noqa: F821
d = Path(os.environ["BENCH_DIR"])
c.JupyterHub.bind_url = os.environ["SPE_HUB_PUBLIC_URL"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(os.environ["BENCH_HUB_PORT"])
c.JupyterHub.db_url = f"sqlite:///{d / 'hub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(d / "cookie_secret")
c.ConfigurableHTTPProxy.command = [os.environ["BENCH_PROXY"]]
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ['BENCH_PROXY_API_PORT']}"
c.ConfigurableHTTPProxy.pid_file = str(d / "proxy.pid")
c.JupyterHub.authenticator_class = "null"
c.JupyterHub.allow_named_servers = True
c.JupyterHub.services = [{"name": "bench", "api_token": os.environ["BENCH_TOKEN"]}]
c.JupyterHub.load_roles = [{"name": "bench", "services": ["bench"], "scopes": [
    "admin:users", "admin:servers", "access:servers", "list:users", "read:users"]}]
c.Spawner.env_keep = []
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 30
runtime = os.environ["SPE_WS_RUNTIME_DIR"]
if os.environ["BENCH_SPAWNER"] == "sandbox":
    from workspaces.spawner import SandboxSpawner
    c.JupyterHub.spawner_class = SandboxSpawner
else:
    c.JupyterHub.spawner_class = "localprocess"
    c.LocalProcessSpawner.cmd = [f"{runtime}/bin/jupyterhub-singleuser"]
'''


def _control_db(data_dir: Path, person: str) -> tuple[str, str]:
    """A control database with one dataset record and one active permit naming ``person``."""
    from permits.schemas import PermitCreate
    from permits.service import PermitService
    from spe.auth.principal import Principal, Role
    from spe.datasets.metadata import ColumnMeta, DatasetMetadata, TableMeta
    from spe.datasets.models import DatasetRecord
    from spe.db import Database

    url = f"sqlite:///{data_dir / 'control.db'}"
    db = Database(url)
    db.upgrade()
    now = datetime.now(UTC).replace(microsecond=0)
    cols = [ColumnMeta(name="person_id", type="BIGINT")]
    meta = DatasetMetadata(name="demo", tables={"person": TableMeta(
        name="person", columns=cols, row_count=1)}, source_format="csv",
        content_sha256="0" * 64)
    with db.write() as s:
        s.add(DatasetRecord(name="demo", store_file="demo.duckdb", created_by="bench",
                            total_rows=1, meta=meta.model_dump(mode="json"), created_at=now))
    body = {
        "reference": "BENCH/1", "title": "spawn benchmark",
        "holder": {"organisation": "bench", "principal_investigator": "bench"},
        "purposes": ["scientific_research"], "purpose_justification": "benchmark",
        "datasets": [{"dataset": "demo", "tables": {"person": ["person_id"]}}],
        "persons": [person],
        "valid_from": (now - timedelta(days=1)).isoformat(),
        "valid_until": (now + timedelta(days=1)).isoformat(),
        "privacy_budget": {"epsilon": 1, "delta": 1e-6, "max_epsilon_per_query": 1},
        "compute_quota": {"gpus": 0, "cpus": 1, "memory_mb": 2048, "disk_mb": 512},
    }
    body_alpha = Principal(subject="bench", username="hdab-bench", kind="service",
                           roles=frozenset({Role.ACCESS_BODY}), access_body="hdab-bench")
    pid = PermitService(db).issue(body_alpha, PermitCreate.model_validate(body)).permit_id
    db.dispose()
    return url, pid


def _measure(hub: HubProcess, token: str, user: str, name: str, spawns: int,
             ) -> tuple[list[float], list[float]]:
    api = f"{hub.public_url}/hub/api"
    h = {"Authorization": f"token {token}"}
    http = httpx.Client(timeout=60, headers=h)
    http.post(f"{api}/users/{user}")
    spawn_s: list[float] = []
    kernel_s: list[float] = []
    for _ in range(spawns):
        t0 = time.perf_counter()
        r = http.post(f"{api}/users/{user}/servers/{name}")
        if r.status_code not in (201, 202):
            raise RuntimeError(f"spawn failed: {r.status_code} {r.text}\n{hub.log_tail()}")
        while True:
            server = http.get(f"{api}/users/{user}").json()["servers"].get(name) or {}
            if server.get("ready"):
                break
            if time.perf_counter() - t0 > 90:
                raise RuntimeError("server not ready after 90 s\n" + hub.log_tail())
            time.sleep(0.02)
        spawn_s.append(time.perf_counter() - t0)
        base = f"{hub.public_url}/user/{user}/{name}"
        t1 = time.perf_counter()
        k = http.post(f"{base}/api/kernels", json={"name": "python3"})
        k.raise_for_status()
        ws = base.replace("http://", "ws://") + f"/api/kernels/{k.json()['id']}/channels"
        assert run_code(ws, h, "print(1)").strip() == "1"
        kernel_s.append(time.perf_counter() - t1)
        http.delete(f"{api}/users/{user}/servers/{name}")
        while (http.get(f"{api}/users/{user}").json()["servers"].get(name) or {}):
            time.sleep(0.05)
    http.close()
    return spawn_s, kernel_s


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawns", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the sandbox needs it")
    runtime = REPO / "var" / "runtime"
    proxy = REPO / "node_modules" / ".bin" / "configurable-http-proxy"
    results: dict[str, tuple[list[float], list[float]]] = {}
    stock_user = "spebench"
    with tempfile.TemporaryDirectory(prefix="spe-bench-spawn-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        data = root / "var"
        data.mkdir()
        url, pid = _control_db(data, "alice")
        from workspaces.lifecycle import server_name

        subprocess.run(["useradd", "--system", "--create-home", "--home-dir",
                        str(root / "home" / stock_user), "--shell", "/usr/sbin/nologin",
                        stock_user], check=True, capture_output=True)
        try:
            for kind, user, name in (("sandbox", "alice", server_name(pid)),
                                     ("stock", stock_user, "bench")):
                hub_dir = root / f"hub-{kind}"
                hub_dir.mkdir(mode=0o700)
                (hub_dir / "config.py").write_text(CONFIG)
                token = secrets.token_hex(24)
                hub_port, api_port = free_port(), free_port()
                env = {"BENCH_DIR": str(hub_dir), "BENCH_TOKEN": token,
                       "BENCH_SPAWNER": kind, "BENCH_HUB_PORT": str(hub_port),
                       "BENCH_PROXY": str(proxy), "BENCH_PROXY_API_PORT": str(free_port()),
                       "SPE_DATA_DIR": str(data), "SPE_DATABASE_URL": url,
                       "SPE_API_PORT": str(api_port),
                       "SPE_WS_ALLOWED_HOST_PORTS": json.dumps([hub_port, api_port]),
                       "SPE_WS_RUNTIME_DIR": str(runtime),
                       "SPE_WS_CGROUP_PARENT": f"spe-bench-{secrets.token_hex(3)}"}
                hub = start_hub(public_url=f"http://127.0.0.1:{free_port()}", env=env,
                                log_path=hub_dir / "hub.log", config=hub_dir / "config.py")
                try:
                    results[kind] = _measure(hub, token, user, name, args.spawns)
                finally:
                    hub.stop()
        finally:
            with contextlib.suppress(Exception):
                subprocess.run(["userdel", stock_user], check=False, capture_output=True)
    rows = [("spawner", "spawn p50 s", "spawn p95 s", "kernel p50 s", "kernel p95 s")]
    for kind, label in (("sandbox", "SandboxSpawner (SPE)"), ("stock", "LocalProcessSpawner")):
        spawn, kernel = results[kind]
        rows.append((label, f"{statistics.median(spawn):.2f}", f"{_pct(spawn, 0.95):.2f}",
                     f"{statistics.median(kernel):.2f}", f"{_pct(kernel, 0.95):.2f}"))
    ratio = statistics.median(results["sandbox"][0]) / statistics.median(results["stock"][0])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"JupyterHub spawn benchmark, {args.spawns} spawns each (same machine, same run)")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"sandbox / stock spawn-to-ready (p50): {ratio:.2f}x")


if __name__ == "__main__":
    main()
