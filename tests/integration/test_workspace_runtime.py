"""The workspace runtime is rebuilt whenever code that runs inside the sandbox changes
(issue 10, item 8): a change to the Ray helper used to leave the old helper in the runtime.

Uses a small stand-in project (the three packages, a Ray helper, a pyproject) and a real venv
from the system Python; only the project install runs (the package part of the stamp is
marked current), so no package index is needed beyond the build backend pip already has.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from workspaces import runtime
from workspaces.errors import StaleRuntime

pytestmark = pytest.mark.skipif(not Path(runtime.SYSTEM_PYTHON).exists(),
                                reason="no system Python to build a runtime from")

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "spe-standin"
version = "0.0.1"

[tool.setuptools.packages.find]
include = ["spe*", "permits*", "workspaces*"]
"""


def _project(root: Path, helper: str) -> Path:
    for pkg in ("spe", "spe/client", "permits", "workspaces"):
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "workspaces" / "ray_head.py").write_text(f"HELPER = {helper!r}\n")
    return root


def _helper(rt: Path) -> str:
    out = subprocess.run([str(rt / "bin" / "python"), "-c",
                          "import workspaces.ray_head as r; print(r.HELPER)"],
                         capture_output=True, text=True, check=True, cwd="/")
    return out.stdout.strip()


def test_every_installed_package_is_hashed() -> None:
    files = {p.relative_to(runtime.ROOT).as_posix() for p in runtime.code_files()}
    assert {"workspaces/ray_head.py", "spe/client/__init__.py", "pyproject.toml"} <= files
    assert not any("__pycache__" in f or "node_modules" in f for f in files)
    data = {p.relative_to(runtime.ROOT).as_posix()
            for p in (runtime.ROOT / "spe" / "datasets" / "omop").glob("*.csv")}
    assert data <= files  # declared package data is installed, so it is hashed


def test_changed_ray_helper_is_reinstalled(tmp_path: Path) -> None:
    project = _project(tmp_path / "project", "v1")
    rt = tmp_path / "runtime"
    subprocess.run([runtime.SYSTEM_PYTHON, "-m", "venv", str(rt)], check=True)
    packages_part = runtime._stamp(runtime.PACKAGES, project).split("-")[0]
    (rt / ".spe-runtime").write_text(f"{packages_part}-never-built\n")

    assert runtime.ensure_current(rt, project) is True
    assert _helper(rt) == "v1"
    assert runtime.ensure_current(rt, project) is False  # current: nothing to do

    digest = runtime._client_digest(project)
    (project / "workspaces" / "ray_head.py").write_text("HELPER = 'v2'\n")
    assert runtime._client_digest(project) != digest  # the helper is part of the stamp
    assert not runtime.is_built(rt, project)
    with pytest.raises(StaleRuntime):
        runtime.check_current(rt, project)
    assert runtime.ensure_current(rt, project) is True
    assert _helper(rt) == "v2"
    runtime.check_current(rt, project)

    # Control: without the rebuild, the sandbox would still run the old helper.
    (project / "workspaces" / "ray_head.py").write_text("HELPER = 'v3'\n")
    assert _helper(rt) == "v2" and not runtime.is_built(rt, project)


def test_changed_packages_are_left_to_the_operator(tmp_path: Path) -> None:
    project = _project(tmp_path / "project", "v1")
    rt = tmp_path / "runtime"
    rt.mkdir()
    (rt / ".spe-runtime").write_text("0000000000000000-0000\n")
    with pytest.raises(StaleRuntime, match="packages"):
        runtime.ensure_current(rt, project)
    shutil.rmtree(rt)
