"""Security review: the control database file and the data holder's DP declaration."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from spe.datasets import defaults
from spe.datasets.omop_spec import load_spec
from spe.db import Database
from spe.errors import IngestError


def test_sqlite_control_database_is_private(tmp_path: Path) -> None:
    """The control database holds permits, grants, wrapped signing keys and the audit log:
    other local users must not be able to read it (nor its WAL)."""
    path = tmp_path / "var" / "control.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.upgrade()
        for name in os.listdir(path.parent):
            mode = stat.S_IMODE(os.stat(path.parent / name).st_mode)
            assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
    finally:
        db.dispose()


def test_existing_sqlite_control_database_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    db = Database(f"sqlite:///{path}")
    try:
        db.upgrade()
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
    finally:
        db.dispose()


@pytest.mark.parametrize("bound", ["nan", "inf", "-inf"])
def test_declared_bounds_must_be_finite(tmp_path: Path, bound: str) -> None:
    """A NaN or infinite clamping bound would reach the DP engine's sensitivity."""
    (tmp_path / "spe-metadata.toml").write_text(
        "version = 1\n[tables.measurement.columns.value_as_number]\n"
        f"lower = 0\nupper = {bound}\n" if bound != "-inf" else
        "version = 1\n[tables.measurement.columns.value_as_number]\n"
        "lower = -inf\nupper = 10\n")
    with pytest.raises(IngestError):
        defaults.load_declaration(tmp_path, load_spec())
