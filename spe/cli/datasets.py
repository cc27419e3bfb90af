"""`spe datasets ingest|list|show|remove` and `spe demo-data`.

State-changing commands (ingest, remove) act as the operator running the CLI and are audited.
Output shows metadata only, never data values.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from spe.errors import SPEError

app = typer.Typer(help="Dataset registry: ingest, list, show and remove OMOP datasets.",
                  no_args_is_help=True)


class OutputFormat(str, Enum):  # noqa: UP042 - typer needs a str Enum
    csv = "csv"
    parquet = "parquet"


def _fail(exc: SPEError) -> typer.Exit:
    typer.secho(f"error: {exc.detail}", fg="red", err=True)
    return typer.Exit(1)


@app.command("ingest")
def ingest_cmd(
    name: str = typer.Argument(..., help="Dataset name (lower-case letters, digits, _ and -)."),
    path: Path = typer.Argument(..., help="Directory of OMOP CDM 5.4 table files (CSV/TSV/"
                                "Parquet) with an optional spe-metadata.yaml/.toml."),
    progress: bool = typer.Option(True, help="Show a progress bar per table."),
) -> None:
    """Ingest an OMOP CDM 5.4 export into the dataset store (atomic, audited)."""
    from spe.cli.main import cli_principal, database, settings
    from spe.datasets.ingest import ingest

    s = settings()
    db = database()
    try:
        result = ingest(db, s, name, path, cli_principal(), progress=progress)
    except SPEError as exc:
        raise _fail(exc) from None
    total = sum(result.rows.values())
    typer.echo(f"ingested {name}: {total:,} rows in {len(result.rows)} tables "
               f"({result.total_seconds:.1f} s)")
    for table, rows in sorted(result.rows.items()):
        typer.echo(f"  {table:<24} {rows:>14,}")


@app.command("list")
def list_cmd() -> None:
    """List registered datasets."""
    from spe.cli.main import database
    from spe.datasets.registry import list_datasets

    infos = list_datasets(database())
    if not infos:
        typer.echo("no datasets")
        return
    typer.echo(f"{'name':<20} {'tables':>6} {'rows':>14}  {'format':<8} created")
    for info in infos:
        typer.echo(f"{info.name:<20} {len(info.metadata.tables):>6} {info.total_rows:>14,}  "
                   f"{info.metadata.source_format:<8} {info.created_at:%Y-%m-%d %H:%M} "
                   f"by {info.created_by}")


@app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="Dataset name."),
    as_json: bool = typer.Option(False, "--json", help="Print the full metadata as JSON."),
) -> None:
    """Show a dataset's metadata: tables, columns, types, row counts, DP metadata."""
    from spe.cli.main import database
    from spe.datasets.registry import get_dataset

    try:
        info = get_dataset(database(), name)
    except SPEError as exc:
        raise _fail(exc) from None
    meta = info.metadata
    if as_json:
        typer.echo(json.dumps(meta.model_dump(mode="json"), indent=2))
        return
    typer.echo(f"{meta.name}: OMOP CDM {meta.cdm_version}, privacy unit {meta.privacy_unit}, "
               f"{info.total_rows:,} rows, source {meta.source_format}, "
               f"sha256 {meta.content_sha256[:16]}...")
    for table in meta.tables.values():
        bound = f", k={table.max_rows_per_person}" if table.person_level else ""
        typer.echo(f"\n  {table.name}: {table.row_count:,} rows, {table.describe_kind()}"
                   f"{bound}")
        for col in table.columns:
            dp = []
            if col.lower is not None or col.upper is not None:
                dp.append(f"bounds [{col.lower}, {col.upper}]")
            if col.year_lower is not None or col.year_upper is not None:
                dp.append(f"years {col.year_lower}-{col.year_upper}")
            if col.public_values is not None:
                dp.append(f"{len(col.public_values)} public values")
            source = f" ({col.dp_source})" if dp else ""
            null = "" if col.nullable else " NOT NULL"
            typer.echo(f"    {col.name:<32} {col.type + null:<18} {', '.join(dp)}{source}".rstrip())


@app.command("remove")
def remove_cmd(
    name: str = typer.Argument(..., help="Dataset name."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a dataset's store file and registry entry (audited; asks for confirmation)."""
    from spe.cli.main import cli_principal, database, settings
    from spe.datasets.registry import get_dataset, remove_dataset

    s = settings()
    db = database()
    try:
        if not yes:
            info = get_dataset(db, name)
            typer.confirm(f"Remove dataset {name!r} ({info.total_rows:,} rows)? "
                          "This deletes its data from the store", abort=True)
        remove_dataset(db, s, name, cli_principal())
    except SPEError as exc:
        raise _fail(exc) from None
    typer.echo(f"removed {name}")


def demo_data(
    persons: int = typer.Option(10_000, "--persons", "-n", min=1, help="Number of persons."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the tables into."),
    fmt: OutputFormat = typer.Option(OutputFormat.csv, "--format", "-f",
                                     help="csv or parquet."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same files."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Write a deterministic synthetic OMOP CDM 5.4 dataset (and its spe-metadata.yaml)."""
    from spe.datasets.generator import generate

    stats = generate(out, persons, seed=seed, fmt=fmt.value, progress=progress)
    typer.echo(f"wrote {stats.total_rows:,} rows for {persons:,} persons to {out} "
               f"({stats.total_seconds:.1f} s)")
    for table, rows in stats.rows.items():
        typer.echo(f"  {table:<24} {rows:>14,}")
