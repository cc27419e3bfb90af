"""Root helpers never trust the caller's environment (issue 10, item 7): every program the
enclave runs as root (``ip``, ``nft``, ``mount``, ``useradd``, ``bwrap``...) is called by
absolute path from the system's directories with a fixed environment.

The attack: a directory early in ``PATH`` holds a fake ``ip`` (and ``LD_PRELOAD`` is set).
Through the helpers, the real ``ip`` runs and the environment is the fixed one; the same call
made the old way (by name, inheriting the environment) runs the fake (the control).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workspaces import helpers, network

pytestmark = pytest.mark.skipif(not shutil.which("ip", path=helpers.FIXED_PATH),
                                reason="iproute2 is not installed")

ROOT_SIDE = ("accounts", "cgroups", "disk", "gpu", "lifecycle", "network", "sandbox",
             "extracts", "backend", "hub_service", "spawner")


@pytest.fixture
def hostile_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    marker = tmp_path / "fake-ran"
    fake = tmp_path / "bin" / "ip"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho fake > {marker}\necho 'ip utility, fake'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ.get('PATH', '')}")
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/evil.so")
    return marker


def test_helpers_ignore_a_hostile_path(hostile_path: Path) -> None:
    out = network._run("ip", "-V")
    assert "iproute2" in out and not hostile_path.exists()
    assert helpers.tool("ip").startswith(("/usr/", "/sbin/", "/bin/"))
    env = helpers.run("env").stdout.split()
    assert sorted(env) == sorted(f"{k}={v}" for k, v in helpers.HELPER_ENV.items())
    # Control: the same call by name, inheriting the environment, runs the fake.
    old = subprocess.run(["ip", "-V"], capture_output=True, text=True, check=False)
    assert "fake" in old.stdout and hostile_path.exists()


def test_helpers_refuse_paths_and_missing_programs() -> None:
    with pytest.raises(ValueError):
        helpers.tool("./ip")
    with pytest.raises(helpers.HelperMissing):
        helpers.tool("spe-no-such-helper")


def test_root_side_modules_run_programs_only_through_helpers() -> None:
    """No root-side module starts a program by a bare name."""
    pkg = Path(helpers.__file__).parent
    offenders = []
    for name in ROOT_SIDE:
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "subprocess" and node.args
                    and isinstance(node.args[0], ast.List) and node.args[0].elts
                    and isinstance(node.args[0].elts[0], ast.Constant)
                    and not str(node.args[0].elts[0].value).startswith("/")):
                offenders.append(f"{name}.py:{node.lineno}")
    assert offenders == []
