"""Registry (list/show/remove/open_dataset), the bundled demo dataset and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.auth.principal import operator_principal
from spe.cli.main import app
from spe.config import Settings, get_settings
from spe.datasets import generator, registry
from spe.datasets.bundled import DEMO_NAME, ensure_demo_dataset
from spe.datasets.ingest import ingest
from spe.db import Database
from spe.errors import NotFound

OPERATOR = operator_principal("tester")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omop_reg")
    generator.generate(out, 150, seed=11, fmt="parquet")
    return out


def _audit(db: Database, action: str) -> list[AuditEntry]:
    with db.read() as session:
        return list(session.execute(select(AuditEntry).where(AuditEntry.action == action)
                                    .order_by(AuditEntry.seq)).scalars())


def test_list_show_open_remove(db: Database, settings: Settings, source: Path) -> None:
    ingest(db, settings, "one", source, OPERATOR)
    ingest(db, settings, "two", source, OPERATOR)
    assert [i.name for i in registry.list_datasets(db)] == ["one", "two"]
    info = registry.get_dataset(db, "one")
    assert info.metadata.tables["person"].row_count == 150
    meta, path = registry.open_dataset(db, settings, "one")
    assert meta.privacy_unit == "person_id" and path == settings.store_dir / "one.duckdb"
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT count(*) FROM person").fetchone()[0] == 150
    con.close()

    registry.remove_dataset(db, settings, "one", OPERATOR)
    assert not path.exists()
    assert [i.name for i in registry.list_datasets(db)] == ["two"]
    assert sorted(p.name for p in settings.store_dir.iterdir()) == ["two.duckdb"]
    removed = _audit(db, "dataset.remove")
    assert [(e.target, e.outcome, e.actor) for e in removed] == [("one", "success", "tester")]
    with pytest.raises(NotFound):
        registry.get_dataset(db, "one")
    with pytest.raises(NotFound):
        registry.open_dataset(db, settings, "one")
    with pytest.raises(NotFound):
        registry.remove_dataset(db, settings, "one", OPERATOR)
    with db.read() as session:
        assert verify_chain(session).ok


def test_bundled_demo_dataset_is_made_once(db: Database, settings: Settings) -> None:
    first = ensure_demo_dataset(settings, db, persons=200, principal=OPERATOR)
    assert "200 persons" in first and "generated" in first
    assert (settings.data_dir / "demo-source" / "person.parquet").is_file()
    again = ensure_demo_dataset(settings, db, persons=200, principal=OPERATOR)
    assert "reused" in again
    assert len(_audit(db, "dataset.ingest")) == 1
    assert registry.get_dataset(db, DEMO_NAME).total_rows > 200


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("SPE_DATA_DIR", str(settings.data_dir))
    assert settings.database_url is not None
    monkeypatch.setenv("SPE_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def test_cli_demo_data_ingest_show_remove(db: Database, cli_env: Settings,
                                          tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo-data", "--persons", "100", "--out", str(out),
                              "--format", "csv", "--seed", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "person.csv").is_file() and (out / "spe-metadata.yaml").is_file()

    res = runner.invoke(app, ["datasets", "ingest", "cli", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "ingested cli" in res.output
    res = runner.invoke(app, ["datasets", "ingest", "cli", str(out), "--no-progress"])
    assert res.exit_code == 1 and "already exists" in res.output

    res = runner.invoke(app, ["datasets", "list"])
    assert res.exit_code == 0 and "cli" in res.output
    res = runner.invoke(app, ["datasets", "show", "cli"])
    assert res.exit_code == 0 and "value_as_number" in res.output
    # Each table's privacy-unit kind (and a linked table's path) is printed.
    assert "measurement: " in res.output and "per-person (person_id), k=" in res.output
    res = runner.invoke(app, ["datasets", "show", "cli", "--json"])
    assert res.exit_code == 0 and '"privacy_unit": "person_id"' in res.output

    res = runner.invoke(app, ["datasets", "remove", "cli"], input="n\n")
    assert res.exit_code != 0
    assert (cli_env.store_dir / "cli.duckdb").is_file()
    res = runner.invoke(app, ["datasets", "remove", "cli"], input="y\n")
    assert res.exit_code == 0, res.output
    assert not (cli_env.store_dir / "cli.duckdb").exists()
    res = runner.invoke(app, ["datasets", "remove", "cli", "--yes"])
    assert res.exit_code == 1 and "no dataset named 'cli'" in res.output

    outcomes = [(e.action, e.outcome) for e in _audit(db, "dataset.ingest")
                + _audit(db, "dataset.remove")]
    assert outcomes == [("dataset.ingest", "success"), ("dataset.ingest", "failure"),
                        ("dataset.remove", "success"), ("dataset.remove", "failure")]
