"""The workspace Python runtime: a venv built from the *system* Python.

Sandboxes bind it read-only at the same path, so it must be world-readable and must not
depend on anything under a home directory (an interpreter under /root, e.g. from pyenv, is
unreadable to workspace accounts). :func:`build` is idempotent (a stamp file records the
package list and a hash of the project's client sources, so a changed ``spe.client`` is
reinstalled) and makes the tree world-readable. The SPE's own code is installed without its
dependencies so ``spe.client`` is importable; its secrets never are (they are not code).

Usage: ``python -m workspaces.runtime build [DIR]`` (default ``var/runtime``).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = (
    "jupyterhub>=5", "jupyterlab>=4", "jupyter_server>=2", "ipykernel>=6", "ray>=2.50",
    "httpx>=0.27", "duckdb>=1.1", "pyarrow>=16", "polars>=1.0", "pandas>=2.2", "numpy>=1.26",
)
ROOT = Path(__file__).resolve().parents[1]


def _client_digest(project: Path = ROOT) -> str:
    """Hash of the project code installed into the runtime (spe.client and what it imports),
    so a changed client is reinstalled."""
    digest = hashlib.sha256()
    for path in [*sorted((project / "spe" / "client").rglob("*.py")), project / "pyproject.toml"]:
        if path.is_file():
            digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _stamp(packages: tuple[str, ...], project: Path = ROOT) -> str:
    packages_hash = hashlib.sha256("\n".join(packages).encode()).hexdigest()[:16]
    return f"{packages_hash}-{_client_digest(project)}"


def is_built(path: Path, project: Path = ROOT) -> bool:
    stamp = path / ".spe-runtime"
    return stamp.is_file() and stamp.read_text().strip() == _stamp(PACKAGES, project)


def build(path: Path, *, constraints: Path | None = None, project: Path = ROOT) -> Path:
    """Create or update the runtime at ``path``; returns ``path``."""
    path = path.resolve()
    if is_built(path, project):
        return path
    if not (path / "bin" / "python").exists():
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q"]
    # The runtime is built from the system Python, whose version may differ from the SPE's
    # own interpreter, so it has its own pins (frozen from a runtime built on Debian's Python).
    if constraints is None and (project / "workspaces" / "runtime-constraints.txt").is_file():
        constraints = project / "workspaces" / "runtime-constraints.txt"
    if constraints is not None:
        pip += ["-c", str(constraints)]
    subprocess.run([*pip, *PACKAGES], check=True)
    subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--force-reinstall", str(project)], check=True)
    subprocess.run(["chmod", "-R", "a+rX,go-w", str(path)], check=True)
    (path / ".spe-runtime").write_text(_stamp(PACKAGES, project) + "\n")
    return path


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "build":
        sys.exit("usage: python -m workspaces.runtime build [DIR]")
    print(build(Path(args[1] if len(args) > 1 else "var/runtime")))
