"""`spe`: the operator's command line. Sub-commands live in small modules beside this one."""

from __future__ import annotations

import getpass
import json

import typer

import spe
from spe.auth.principal import Principal, operator_principal
from spe.config import Settings, get_settings
from spe.db import Database

app = typer.Typer(help="Secure processing environment (EHDS) operator CLI.",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Control-plane database.", no_args_is_help=True)
audit_app = typer.Typer(help="Audit log.", no_args_is_help=True)
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
    """Show every option, its value (secrets masked) and what it does."""
    for row in settings().describe():
        typer.echo(f"{row['name']} = {row['value']}\n    {row['help']}")


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit hash chain; exit 1 at the first broken link."""
    from spe.audit import verify_chain

    db = database()
    with db.read() as session:
        report = verify_chain(session)
    if report.ok:
        typer.echo(f"audit chain intact: {report.entries} entries")
        return
    typer.secho(f"audit chain BROKEN at entry {report.first_bad_seq}: {report.problem}",
                fg="red", err=True)
    raise typer.Exit(1)


@audit_app.command("export")
def audit_export(
    after: int = typer.Option(0, help="Only entries with a sequence number above this."),
) -> None:
    """Write the audit log as JSON lines (one entry per line, with its hashes) to stdout."""
    from sqlalchemy import select

    from spe.audit.models import AuditEntry
    from spe.audit.writer import entry_fields

    db = database()
    with db.read() as session:
        rows = session.execute(
            select(AuditEntry).where(AuditEntry.seq > after).order_by(AuditEntry.seq)
        ).scalars()
        for entry in rows:
            line = {"seq": entry.seq, **entry_fields(entry), "prev_hash": entry.prev_hash,
                    "entry_hash": entry.entry_hash}
            typer.echo(json.dumps(line, sort_keys=True))


@app.command()
def openapi() -> None:
    """Print the OpenAPI document (no service is started, no database is touched)."""
    from spe.api.app import create_app

    s = Settings(database_url="sqlite:///:memory:")
    typer.echo(json.dumps(create_app(s, Database(s.resolved_database_url)).openapi(), indent=2))


def _register() -> None:
    from spe.auth import cli as auth_cli
    from spe.cli import datasets as datasets_cli
    from spe.cli import doctor as doctor_cli
    from spe.cli import up as up_cli

    app.add_typer(auth_cli.app, name="auth")
    app.add_typer(datasets_cli.app, name="datasets")
    app.command("demo-data")(datasets_cli.demo_data)
    app.command("up")(up_cli.up)
    app.command("doctor")(doctor_cli.doctor)


_register()
