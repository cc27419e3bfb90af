"""`spe up`: run the SPE on embedded defaults and print what runs where."""

from __future__ import annotations

import subprocess
from pathlib import Path

import typer

from spe.cli.main import cli_principal, database, settings

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def _start_keycloak(port: int) -> str | None:
    script = INFRA / "keycloak" / "keycloak.sh"
    if not script.is_file():
        return None
    subprocess.run([str(script), "start", "--port", str(port)], check=True)
    return f"http://127.0.0.1:{port}"


def up(
    persons: int = typer.Option(20_000, help="Persons in the bundled synthetic dataset "
                                "(generated on first start only)."),
    keycloak: bool = typer.Option(True, help="Start the bundled Keycloak when no external "
                                  "keycloak_url is configured."),
) -> None:
    """Start the SPE: database, bundled synthetic dataset, Keycloak and the API."""
    import uvicorn

    from spe.api.app import create_app
    from spe.datasets.bundled import ensure_demo_dataset
    from spe.logs import configure

    s = settings()
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
    width = max(len(name) for name, _ in rows)
    typer.echo("SPE is starting:")
    for name, where in rows:
        typer.echo(f"  {name.ljust(width)}  {where}")
    configure(s.log_level)
    uvicorn.run(create_app(s, db), host=s.api_host, port=s.api_port, log_config=None)
