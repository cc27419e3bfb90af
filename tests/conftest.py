"""Shared fixtures: settings in a temporary data dir, and a control-plane database on each of
SQLite and PostgreSQL (the real server started by scripts/services.sh; set
SPE_TEST_POSTGRES_URL to point elsewhere)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from spe.config import Settings
from spe.db import Database

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PG_URL = os.environ.get("SPE_TEST_POSTGRES_URL")
pytest_plugins = ["tests.keycloak_fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--audit-crash-long", action="store_true",
                     help="the audit SIGKILL crash test kills 1,000 times (200 by default)")


def _fresh_pg_database() -> tuple[str, str]:
    assert PG_URL
    name = f"spe_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False), name


def _drop_pg_database(name: str) -> None:
    assert PG_URL
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty control-plane database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
        return
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("SPE_TEST_POSTGRES_URL is not set in CI: PostgreSQL must be tested")
        pytest.skip("PostgreSQL not started (run scripts/services.sh start)")
    url, name = _fresh_pg_database()
    try:
        yield url
    finally:
        _drop_pg_database(name)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "var", database_url=db_url)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'control.db'}")
    database.upgrade()
    yield database
    database.dispose()
