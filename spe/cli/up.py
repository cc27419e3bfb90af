"""`spe up`: run the SPE on embedded defaults and print what runs where."""

from __future__ import annotations

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


def _start_keycloak(port: int) -> str | None:
    script = INFRA / "keycloak" / "keycloak.sh"
    if not script.is_file():
        return None
    subprocess.run([str(script), "start", "--port", str(port)], check=True)
    return f"http://127.0.0.1:{port}"


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
    hub = start_hub(public_url=public_url, env=env, log_path=s.data_dir / "hub" / "hub.log")
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
    rows = [("control database", s.resolved_database_url.split("?")[0]),
            ("dataset store", str(s.store_dir.resolve())),
            ("demo dataset", dataset)]
    if s.keycloak_url:
        rows.append(("keycloak (external)", s.keycloak_url))
    elif keycloak:
        url = _start_keycloak(s.keycloak_port)
        rows.append(("keycloak", url or "not bundled in this checkout"))
    rows.append(("SPE API", s.api_base_url + "/docs"))
    rows.append(("SPE console", s.api_base_url + "/register  (log in for admins, access bodies)"))
    hub_process = None
    if hub:  # no hub of this data dir runs yet: whatever a workspace left is an orphan
        for line in _reconcile(s, db, include_live=True):
            typer.echo(f"reconciled {line}")
        where, hub_process = _start_hub(s, hub_url.rstrip("/"))
        rows.append(("JupyterHub", where))
    width = max(len(name) for name, _ in rows)
    typer.echo("SPE is starting:")
    for name, where in rows:
        typer.echo(f"  {name.ljust(width)}  {where}")
    configure(s.log_level)
    # uvicorn re-raises SIGTERM after its graceful shutdown: turn it into KeyboardInterrupt so
    # the hub (and with it the workspaces) is stopped below instead of being orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cert, key = uvicorn_tls(s)
        uvicorn.run(create_app(s, db), host=s.api_host, port=s.api_port, log_config=None,
                    ssl_certfile=cert, ssl_keyfile=key)
    except KeyboardInterrupt:
        pass
    finally:
        if hub_process is not None:
            hub_process.stop(timeout=3.0)
