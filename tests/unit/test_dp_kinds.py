"""DP aggregate kinds are exhaustive: a kind without its branches does not type-check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spe.dp import kinds
from spe.dp.kinds import KINDS, AggKind, spec

SOURCE = Path(kinds.__file__)


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental",
                           "--ignore-missing-imports", "--python-version", "3.11",
                           "--no-site-packages", str(path)],
                          capture_output=True, text=True, timeout=300, check=False)


def test_every_kind_has_its_row() -> None:
    assert set(KINDS) == set(AggKind)
    for kind, row in KINDS.items():
        assert row.roles and row.stats and row.release, kind
    assert spec(AggKind.COUNT, counts_rows=False).roles == ("nvals",)


@pytest.mark.timeout(600)
def test_mypy_rejects_a_kind_without_its_branches(tmp_path: Path) -> None:
    text = SOURCE.read_text()
    intact = tmp_path / "intact" / "kinds.py"
    intact.parent.mkdir()
    intact.write_text(text)
    assert _mypy(intact).returncode == 0  # control: the module as shipped type-checks
    marker = '    QUANTILE = "quantile"\n'
    assert marker in text
    broken = tmp_path / "broken" / "kinds.py"
    broken.parent.mkdir()
    broken.write_text(text.replace(marker, marker + '    MODE = "mode"\n'))
    result = _mypy(broken)
    assert result.returncode != 0
    assert "assert_never" in result.stdout
