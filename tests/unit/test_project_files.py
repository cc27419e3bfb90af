"""What a fresh clone shows (issue 18): the licence, the security policy, the contributor guide,
a changelog whose newest version is the one `spe version` prints, and hashed locks that cover
every dependency pyproject.toml and the workspace runtime ask for."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from typer.testing import CliRunner

import spe
from spe.cli.main import app
from workspaces import runtime

ROOT = Path(__file__).resolve().parents[2]


def _supply_chain() -> ModuleType:
    spec = importlib.util.spec_from_file_location("supply_chain",
                                                  ROOT / "scripts" / "supply_chain.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["supply_chain"] = module
    spec.loader.exec_module(module)
    return module


sc = _supply_chain()


def test_licence_notice_policy_and_guide_are_in_the_clone() -> None:
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert "Apache License, Version 2.0" in (ROOT / "NOTICE").read_text()
    security = (ROOT / "SECURITY.md").read_text()
    for heading in ("## Supported versions", "## Reporting a vulnerability",
                    "## What the SPE guarantees", "## What it does not guarantee"):
        assert heading in security
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    for heading in ("## Set-up", "## Tests", "## Conventions", "## Adding a security test",
                    "## Dependencies and the locks"):
        assert heading in contributing
    assert "scripts/lock.sh" in contributing


def _changelog_version() -> str:
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+[^\]]*)\] - \d{4}-\d{2}-\d{2}$", text, re.M)
    assert versions, "CHANGELOG.md names no version"
    return versions[0]


def test_spe_version_prints_the_newest_changelog_version() -> None:
    newest = _changelog_version()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == newest
    assert spe.__version__ == newest
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0 and result.output.strip() == newest


def test_locks_hash_every_requirement_and_cover_the_project() -> None:
    for name in ("dev.txt", "runtime.txt", "lock-tools.txt"):
        text = (ROOT / "requirements" / name).read_text()
        locked = sc.parse_lock(ROOT / "requirements" / name)
        assert locked, name
        assert all(hashes for _, hashes in locked.values()), name
        assert len(locked) == len(re.findall(r"^\S+==", text, re.M))
    dev = sc.parse_lock(ROOT / "requirements" / "dev.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name = sc.canonical(re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0])
        assert name in dev, f"{name} (pyproject.toml) is not in requirements/dev.txt: " \
                            "run scripts/lock.sh"
    rt = sc.parse_lock(ROOT / "requirements" / "runtime.txt")
    for spec in runtime.PACKAGES:
        assert sc.canonical(re.split(r"[<>=!~ ]", spec, maxsplit=1)[0]) in rt
    listed = [line for line in (ROOT / "requirements" / "runtime.in").read_text().splitlines()
              if line and not line.startswith("#")]
    assert tuple(listed) == runtime.PACKAGES, "run scripts/lock.sh"
    for build_req in ("pip", "setuptools", "wheel"):
        assert build_req in dev and build_req in rt


def test_every_npm_package_has_an_integrity_hash() -> None:
    lock = json.loads((ROOT / "package-lock.json").read_text())
    packages = {k: v for k, v in lock["packages"].items() if k}
    assert packages
    assert all(str(v.get("integrity", "")).startswith("sha512-") for v in packages.values())
    manifest = json.loads((ROOT / "package.json").read_text())
    assert lock["packages"][""]["dependencies"] == manifest["dependencies"]


def test_build_artefacts_are_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/var/" in ignored  # var/sbom, var/runtime, var/lock-tools


def test_pre_commit_runs_the_checks_ci_runs() -> None:
    import yaml

    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    assert all(repo["repo"] == "local" for repo in config["repos"])  # nothing fetched
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert hooks["ruff"]["entry"] in test_sh  # .venv/bin/ruff check
    assert hooks["mypy"]["entry"] in test_sh  # .venv/bin/mypy spe permits workspaces
    layers = hooks["import-layers"]["entry"].split()[-1]
    assert (ROOT / layers).is_file() and layers.startswith("tests/unit/")  # CI runs tests/
    for hook in hooks.values():
        assert hook["language"] == "system"
        assert (ROOT / hook["entry"].split()[0]).name in ("ruff", "mypy", "python")
