"""`spe up`: run the SPE on embedded defaults and print what runs where."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from spe.cli.main import cli_principal, database, settings
from spe.config import Settings
from spe.db import Database

if TYPE_CHECKING:
    from workspaces.hub import HubProcess

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


DEMO_LOGINS = ("researcher alice / alice-dev-password; hospital admins hadmin, hadmin2; "
               "access body officer-alpha (each <name>-dev-password, development realm only)")


def _start_keycloak(port: int) -> tuple[str | None, bool]:
    """Start the bundled Keycloak unless one already answers; (url, whether we started it)."""
    script = INFRA / "keycloak" / "keycloak.sh"
    if not script.is_file():
        return None, False
    running = subprocess.run([str(script), "status"], capture_output=True).returncode == 0
    subprocess.run([str(script), "start", "--port", str(port)], check=True)
    return f"http://127.0.0.1:{port}", not running


def _stop_keycloak() -> subprocess.Popen[bytes]:
    """Ask the Keycloak this `spe up` started to stop (TERM now; the caller waits)."""
    return subprocess.Popen([str(INFRA / "keycloak" / "keycloak.sh"), "stop"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _health(s: Settings, hub_url: str | None, keycloak_url: str | None,
            dataset: str, timeout: float) -> list[tuple[str, str | None]]:
    """Poll every service until healthy or ``timeout``; (name, None or why not) each."""
    import time

    import httpx

    checks: dict[str, str] = {"SPE API": s.api_base_url + "/healthz",
                              "SPE console": s.api_base_url + "/register"}
    if keycloak_url:
        checks["keycloak realm"] = (f"{keycloak_url.rstrip('/')}/realms/{s.keycloak_realm}"
                                    "/.well-known/openid-configuration")
    if hub_url:
        checks["JupyterHub login (through the proxy)"] = hub_url + "/hub/login"
    failing: dict[str, str | None] = dict.fromkeys(checks, "not tried")
    deadline = time.monotonic() + timeout
    while any(failing.values()) and time.monotonic() < deadline:
        for name, url in checks.items():
            if failing[name] is None:
                continue
            try:
                resp = httpx.get(url, timeout=5, verify=False)  # noqa: S501 - local liveness only
                failing[name] = None if resp.status_code == 200 else f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                failing[name] = type(exc).__name__
        if any(failing.values()):
            time.sleep(1)
    results = list(failing.items())
    results.append(("bundled dataset ingested", None if dataset else "no dataset"))
    return results


def _start_hub(s: Settings, public_url: str) -> tuple[str, HubProcess | None]:
    """Start JupyterHub (root only: the sandboxes need it); returns (where, process)."""
    import json
    import os

    from workspaces.hub import start_hub
    from workspaces.settings import get_workspace_settings

    if os.geteuid() != 0:
        return "not started (needs root for the workspace sandboxes)", None
    if not (REPO / "node_modules" / ".bin" / "configurable-http-proxy").exists():
        return "not started (run `npm install --prefix .` for the proxy)", None
    ws = get_workspace_settings()
    if not (ws.runtime_dir / "bin" / "jupyterhub-singleuser").exists():
        return ("not started (build the runtime: python -m workspaces.runtime build "
                f"{ws.runtime_dir})"), None
    env = {"SPE_DATA_DIR": str(s.data_dir.resolve()),
           "SPE_DATABASE_URL": s.resolved_database_url,
           "SPE_KEYCLOAK_URL": s.keycloak_base_url,
           "SPE_API_PORT": str(s.api_port),
           "SPE_WS_RUNTIME_DIR": str(ws.runtime_dir.resolve())}
    from spe.cli.production import hub_tls_env

    env.update(hub_tls_env(s))
    if s.api_port not in ws.allowed_host_ports:
        env["SPE_WS_ALLOWED_HOST_PORTS"] = json.dumps([ws.allowed_host_ports[0], s.api_port])
    if not {"SPE_HUB_OAUTH_CLIENT_SECRET", "SPE_HUB_OAUTH_CLIENT_SECRET_FILE"} & set(os.environ):
        if s.profile != "dev":
            return "not started (set SPE_HUB_OAUTH_CLIENT_SECRET_FILE)", None
        env["SPE_HUB_OAUTH_CLIENT_SECRET"] = "jupyterhub-dev-secret"  # noqa: S105 - dev realm
    hub = start_hub(public_url=public_url, env=env, log_path=s.data_dir / "hub" / "hub.log",
                    proxy_pid_file=s.data_dir / "hub" / "proxy.pid")
    return f"{public_url}/hub/login  (log: {hub.log_path})", hub


def _reconcile(s: Settings, db: Database, *, include_live: bool) -> list[str]:
    """Clean what workspaces of this data dir left behind (root only); one line each."""
    import os

    from workspaces.reconcile import reconcile as reconcile_host
    from workspaces.settings import get_workspace_settings

    if os.geteuid() != 0:
        return []
    done = reconcile_host(db, s.data_dir, cgroup_parent=get_workspace_settings().cgroup_parent,
                          include_live=include_live)
    return [f"{c.ws_id}: still running, left alone" if c.skipped_live else
            f"{c.ws_id}: removed {', '.join(c.removed) or 'nothing'}; record was {c.record_was}"
            for c in done]


def reconcile(
    include_live: bool = typer.Option(False, help="Also clean workspaces whose processes "
                                      "still run (only when no hub of this data dir runs)."),
) -> None:
    """Clean the namespaces, nftables tables, veths, cgroups, mounts, loop devices and
    records that workspaces of this data dir left after an unclean stop (audited)."""
    lines = _reconcile(settings(), database(upgrade=True), include_live=include_live)
    for line in lines:
        typer.echo(line)
    typer.echo(f"reconciled {len(lines)} workspace(s)")


def up(
    persons: int = typer.Option(20_000, help="Persons in the bundled synthetic dataset "
                                "(generated on first start only)."),
    keycloak: bool = typer.Option(True, help="Start the bundled Keycloak when no external "
                                  "keycloak_url is configured."),
    hub: bool = typer.Option(True, help="Start JupyterHub with the sandboxed workspaces "
                             "(as root)."),
    hub_url: str = typer.Option("http://127.0.0.1:8000", help="Public URL of the hub."),
    check: bool = typer.Option(False, "--check", help="Start (or find running) every service, "
                               "wait until all are healthy, print them and exit: 0 when all "
                               "are, 1 naming the unhealthy ones (with the hub's log tail)."),
    check_timeout: float = typer.Option(180.0, help="Seconds --check waits for health."),
    tls: bool = typer.Option(False, "--tls", help="Serve the API, console and hub's gate over "
                             "HTTPS with a local development CA (data_dir/tls) unless "
                             "tls_cert_file is set; the hub URL becomes https."),
) -> None:
    """Start the SPE: database, bundled synthetic dataset, Keycloak, the API and the hub."""
    import uvicorn

    from spe.api.app import create_app
    from spe.cli.production import trust_ca_in_process, uvicorn_tls, with_local_tls
    from spe.datasets.bundled import ensure_demo_dataset
    from spe.logs import configure

    s = settings()
    if tls:
        hub_url = hub_url.replace("http://", "https://", 1)
        s = with_local_tls(s, hub_url)
    trust_ca_in_process(s)
    db = database(upgrade=True)
    dataset = ensure_demo_dataset(s, db, persons=persons, principal=cli_principal())
    kc_url: str | None = s.keycloak_url or None
    kc_started = False
    rows = [("control database", s.resolved_database_url.split("?")[0]),
            ("dataset store", str(s.store_dir.resolve())),
            ("demo dataset", dataset)]
    if s.keycloak_url:
        rows.append(("keycloak (external)", s.keycloak_url))
    elif keycloak:
        kc_url, kc_started = _start_keycloak(s.keycloak_port)
        rows.append(("keycloak", kc_url or "not bundled in this checkout"))
    rows.append(("SPE API", s.api_base_url + "/docs"))
    rows.append(("SPE console", s.api_base_url + "/register  (log in for admins, access bodies)"))
    hub_process = None
    if hub:  # no hub of this data dir runs yet: whatever a workspace left is an orphan
        for line in _reconcile(s, db, include_live=True):
            typer.echo(f"reconciled {line}")
        where, hub_process = _start_hub(s, hub_url.rstrip("/"))
        rows.append(("JupyterHub", where))
    rows.append(("demo logins", DEMO_LOGINS))
    width = max(len(name) for name, _ in rows)
    typer.echo("SPE is starting:")
    for name, where in rows:
        typer.echo(f"  {name.ljust(width)}  {where}")
    configure(s.log_level)
    # uvicorn re-raises SIGTERM after its graceful shutdown: turn it into KeyboardInterrupt so
    # the hub (and with it the workspaces) is stopped below instead of being orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cert, key = uvicorn_tls(s)
    server = uvicorn.Server(uvicorn.Config(
        create_app(s, db), host=s.api_host, port=s.api_port, log_config=None,
        ssl_certfile=cert, ssl_keyfile=key, timeout_graceful_shutdown=2))
    healthy = True
    try:
        if check:
            import threading

            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            hub_where = hub_process.public_url if hub_process is not None else None
            results = _health(s, hub_where, kc_url, dataset, check_timeout)
            for name, why in results:
                typer.echo(f"  {'ok  ' if why is None else 'FAIL'} {name}"
                           + ("" if why is None else f": {why}"))
            healthy = all(why is None for _, why in results)
            if not healthy and hub_process is not None:
                typer.echo("hub log tail:\n" + hub_process.log_tail(3000), err=True)
            server.should_exit = True
            thread.join(10)
        else:
            server.run()
    except KeyboardInterrupt:
        pass
    finally:
        kc_stop = _stop_keycloak() if kc_started else None
        if hub_process is not None:
            hub_process.stop(timeout=3.0)
            # a workspace the hub had no time to stop (killed after 3 s) is an orphan now
            with contextlib.suppress(Exception):
                for line in _reconcile(s, db, include_live=True):
                    typer.echo(f"stopped what the hub left: {line}")
        if kc_stop is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                kc_stop.wait(5)
    if not healthy:
        raise typer.Exit(1)
