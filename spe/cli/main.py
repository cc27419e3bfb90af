"""`spe`: the operator's command line. Sub-commands live in small modules beside this one."""

from __future__ import annotations

import getpass
import json

import typer

import spe
from spe.auth.principal import Principal, operator_principal
from spe.cli.audit import app as audit_app
from spe.config import Settings, get_settings
from spe.db import Database

app = typer.Typer(help="Secure processing environment (EHDS) operator CLI.",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Control-plane database.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(config_app, name="config")


def settings() -> Settings:
    try:
        return get_settings()
    except Exception as exc:  # pydantic.ValidationError and TOML errors
        typer.secho(f"invalid settings: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


def database(upgrade: bool = True) -> Database:
    db = Database(settings().resolved_database_url)
    if upgrade:
        db.upgrade()
    return db


def cli_principal() -> Principal:
    return operator_principal(getpass.getuser())


@app.command()
def version() -> None:
    """Print the SPE version."""
    typer.echo(spe.__version__)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the control-plane database to the newest schema."""
    database(upgrade=True)
    typer.echo("database is at the newest schema")


@config_app.command("show")
def config_show() -> None:
    """Show every option, its value (secrets masked) and what it does: the SPE's (``SPE_*``)
    and the workspaces' (``SPE_WS_*``)."""
    from workspaces.settings import get_workspace_settings

    for row in settings().describe():
        typer.echo(f"{row['name']} = {row['value']}\n    {row['help']}")
    typer.echo("\n# workspaces (environment prefix SPE_WS_)")
    ws = get_workspace_settings()
    for name, field in type(ws).model_fields.items():
        typer.echo(f"ws.{name} = {getattr(ws, name)}\n    {field.description}")


@app.command()
def openapi() -> None:
    """Print the OpenAPI document (no service is started, no database is touched)."""
    from spe.api.app import create_app

    s = Settings(database_url="sqlite:///:memory:")
    typer.echo(json.dumps(create_app(s, Database(s.resolved_database_url)).openapi(), indent=2))


def _register() -> None:
    from spe.airlock import cli as airlock_cli
    from spe.auth import cli as auth_cli
    from spe.cli import datasets as datasets_cli
    from spe.cli import doctor as doctor_cli
    from spe.cli import encryption as encryption_cli
    from spe.cli import incident as incident_cli
    from spe.cli import up as up_cli

    app.add_typer(airlock_cli.app, name="airlock")
    app.add_typer(auth_cli.app, name="auth")
    app.add_typer(datasets_cli.app, name="datasets")
    app.add_typer(encryption_cli.app, name="encryption")
    app.add_typer(incident_cli.app, name="incident")
    app.command("demo-data")(datasets_cli.demo_data)
    app.command("up")(up_cli.up)
    app.command("reconcile")(up_cli.reconcile)
    app.command("doctor")(doctor_cli.doctor)


_register()
