"""`spe doctor`: the deployment against the production profile (spe.cli.doctor_checks)."""

from __future__ import annotations

import json

import typer


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Check this deployment against the production profile; exit 1 naming what is missing."""
    from spe.cli.doctor_checks import run_checks
    from spe.cli.main import settings

    checks = run_checks(settings())
    if as_json:
        typer.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = typer.style(" ok ", fg="green") if c.ok else typer.style("MISS", fg="red")
            typer.echo(f"[{mark}] {c.name:<{width}}  {c.found}")
            if not c.ok:
                typer.echo(f"       {'':<{width}}  -> {c.fix}")
        missing = [c.name for c in checks if not c.ok]
        typer.echo("" if not missing else f"\n{len(missing)} of {len(checks)} controls missing")
    if any(not c.ok for c in checks):
        raise typer.Exit(1)
