"""The import-linter contracts (.importlinter) hold for the tree, and fail on a wrong import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / ".importlinter"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(ROOT / ".importlinter", root / ".importlinter")
    for package in ("spe", "permits", "workspaces"):
        shutil.copytree(ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.csv", "*.parquet"))
    return root


def test_contracts_kept_and_a_wrong_import_breaks_them(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    kept = _lint(root)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    # The kernel reaching up into a package: the layers contract must fail.
    config = root / "spe" / "errors.py"
    config.write_text(config.read_text() + "\nimport permits.models  # noqa\n")
    # The DP engine reaching the permit tables, a workspace module reaching the routes.
    engine = root / "spe" / "dp" / "engine.py"
    engine.write_text(engine.read_text() + "\nimport permits.models  # noqa\n")
    spawner = root / "workspaces" / "spawner.py"
    spawner.write_text(spawner.read_text() + "\nimport permits.api  # noqa\n")
    broken = _lint(root)
    out = broken.stdout
    assert broken.returncode == 1, out + broken.stderr
    assert "spe.errors is not allowed to import permits" in out.replace("\n", " ") or \
        "Layers" in out.split("Broken contracts", 1)[-1], out
    assert "spe.dp is not allowed to import permits.models" in out, out
    assert "workspaces is not allowed to import permits.api" in out, out
