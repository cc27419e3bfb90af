"""`spe datasets ...` and `spe demo-data` (being built)."""

import typer

app = typer.Typer(help="Dataset registry.", no_args_is_help=True)


def demo_data() -> None:
    """Write a synthetic OMOP CDM 5.4 dataset."""
    raise typer.Exit(2)
