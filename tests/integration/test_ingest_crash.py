"""An ingest killed with SIGKILL part-way leaves no dataset, and the next ingest of the same
name recovers: it removes the leftovers (audited) and succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.auth.principal import operator_principal
from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest, store_path
from spe.datasets.models import DatasetRecord
from spe.datasets.recovery import ingest_lock
from spe.db import Database
from spe.errors import Conflict

ROOT = Path(__file__).resolve().parents[2]


def _kill_mid_ingest(settings: Settings, source: Path) -> None:
    env = {**os.environ, "SPE_DATA_DIR": str(settings.data_dir),
           "SPE_DATABASE_URL": settings.resolved_database_url}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from spe.cli.main import app; app()",
         "datasets", "ingest", "big", str(source)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    store = settings.store_dir
    try:
        while time.monotonic() < deadline:
            if store.is_dir() and any(p.name.endswith(".tmp.duckdb") for p in store.iterdir()):
                break
            assert proc.poll() is None, "ingest finished before it could be killed"
            time.sleep(0.01)
        else:
            pytest.fail("ingest never started building its temporary database")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_ingest_leaves_nothing_and_is_recovered(db: Database, settings: Settings,
                                                       tmp_path: Path) -> None:
    source = tmp_path / "src"
    generator.generate(source, 20000, seed=3, fmt="csv")
    _kill_mid_ingest(settings, source)

    with db.read() as session:
        assert session.execute(select(DatasetRecord)).first() is None
    left = [p.name for p in settings.store_dir.iterdir()]
    assert left, "the killed ingest should have left its temporary files (or the test is moot)"

    result = ingest(db, settings, "big", source, operator_principal("op"))
    assert result.path == store_path(settings, "big")
    remaining = sorted(p.name for p in settings.store_dir.iterdir())
    assert remaining == ["big.duckdb"]
    with db.read() as session:
        actions = [e.action for e in session.execute(select(AuditEntry)).scalars()]
    assert "dataset.recover" in actions and "dataset.ingest" in actions


def test_concurrent_ingest_of_same_name_refused(db: Database, settings: Settings,
                                                tmp_path: Path) -> None:
    source = tmp_path / "src"
    generator.generate(source, 50, seed=1, fmt="csv")
    with ingest_lock(settings.data_dir / "locks", "busy"), pytest.raises(Conflict) as err:
        ingest(db, settings, "busy", source, operator_principal("op"))
    assert "already running" in err.value.detail
