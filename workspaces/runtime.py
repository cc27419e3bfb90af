"""The workspace Python runtime: a venv built from the *system* Python.

Sandboxes bind it read-only at the same path, so it must be world-readable and must not
depend on anything under a home directory (an interpreter under /root, e.g. from pyenv, is
unreadable to workspace accounts). :func:`build` is idempotent (a stamp file records the
package list and a hash of the project's client sources, so a changed ``spe.client`` is
reinstalled) and makes the tree world-readable. The SPE's own code is installed without its
dependencies so ``spe.client`` is importable; its secrets never are (they are not code).

Rebuilt whenever code that runs inside the sandbox changes: the stamp's code part hashes
every file the project install puts into the runtime (the ``spe``, ``permits`` and
``workspaces`` packages, e.g. the client and the Ray helper :mod:`workspaces.ray_head`, and
``pyproject.toml``), so any change there reinstalls the project (only the project: a changed
package list reinstalls the packages). :func:`check_current` lets a starter refuse a stale
runtime instead of running old code in the sandbox.

Supply chain: every package comes from the hashed lock ``requirements/runtime.txt`` (written by
``scripts/lock.sh`` from :data:`PACKAGES`) and pip installs it with ``--require-hashes``, so a
wheel whose hash differs from the lock is refused (:func:`install_locked`). The project itself
is built into a wheel by the SPE's own interpreter, without build isolation (its build back-end
comes from the SPE's lock too), and installed without dependencies. Each install leaves pip's
report (the hash of every file installed) in ``<runtime>/.spe-install-reports`` for the SBOM.

Usage: ``python -m workspaces.runtime build [DIR]`` (default ``var/runtime``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from workspaces import helpers

SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = (
    "jupyterhub>=5", "jupyterlab>=4", "jupyter_server>=2", "ipykernel>=6", "ray>=2.50",
    "httpx>=0.27", "duckdb>=1.1", "pyarrow>=16", "polars>=1.0", "pandas>=2.2", "numpy>=1.26",
    # The analysis stack researchers expect (issue 15): plots, statistics, models, survival.
    "matplotlib>=3.8", "scipy>=1.11", "statsmodels>=0.14", "scikit-learn>=1.4",
    "lifelines>=0.29",
)
ROOT = Path(__file__).resolve().parents[1]
#: The runtime's lock, relative to the project: every package with the hashes pip accepts.
LOCK = Path("requirements") / "runtime.txt"


#: IPython's configuration for every kernel and IPython shell of the runtime: IPython reads
#: ``<sys.prefix>/etc/ipython/ipython_config.py`` (kernels too) before the user's profile, so
#: the ``%%dp`` magic is there in a new notebook without ``%load_ext`` (a researcher's own
#: profile may still set other extensions).
IPYTHON_CONFIG = Path("etc") / "ipython" / "ipython_config.py"
IPYTHON_CONFIG_TEXT = """\
# Written by workspaces.runtime (the workspace runtime's build): edit that, not this file.
c.InteractiveShellApp.extensions = ["spe.client.magic"]
"""
#: Enables the workspace's Jupyter server extension (:mod:`workspaces.labserver`): the
#: JupyterLab panel's only way to the SPE API, holding the workspace token server-side.
SERVER_CONFIG = Path("etc") / "jupyter" / "jupyter_server_config.d" / "spe-workspace.json"
SERVER_CONFIG_TEXT = '{"ServerApp": {"jpserver_extensions": {"workspaces.labserver": true}}}\n'

#: The project's packages that ``pip install`` copies into the runtime (pyproject.toml).
INSTALLED_PACKAGES = ("spe", "permits", "workspaces")
_SKIP_DIRS = {"__pycache__", "node_modules"}
#: The prebuilt JupyterLab extension (the side panel and "Request export"): built from
#: ``workspaces/labextension`` by scripts/setup.sh (npm and JupyterLab's builder) into this
#: folder, copied into the runtime by the build. Its package.json names the build's hashed
#: bundle, so it is part of the stamp: a rebuilt extension is reinstalled.
LABEXTENSION_BUILD = Path("var") / "labextension"
LABEXTENSION_NAME = "@spe/workspace-labextension"


def code_files(project: Path = ROOT) -> list[Path]:
    """Every file the project install puts into the runtime: the packages' Python modules,
    their declared package data (``[tool.setuptools.package-data]``) and ``pyproject.toml``.
    Build trees inside the packages (``node_modules``, caches) are not installed: not hashed."""
    import tomllib

    pyproject = project / "pyproject.toml"
    meta = tomllib.loads(pyproject.read_text()) if pyproject.is_file() else {}
    data = meta.get("tool", {}).get("setuptools", {}).get("package-data", {})
    files = {pyproject}
    for package in INSTALLED_PACKAGES:
        root = project / package
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
            files.update(Path(dirpath) / n for n in names if n.endswith(".py"))
        for pattern in data.get(package, []):
            files.update(p for p in root.glob(pattern) if p.is_file())
    if (project / LABEXTENSION_BUILD / "package.json").is_file():
        files.add(project / LABEXTENSION_BUILD / "package.json")
    return sorted(files)


_DIGESTS: dict[tuple[tuple[str, int, int], ...], str] = {}


def _client_digest(project: Path = ROOT) -> str:
    """Hash of the project code installed into the runtime (all of it: whatever runs inside
    the sandbox, the client, the Ray helper...), so any change is reinstalled."""
    files = [p for p in code_files(project) if p.is_file()]
    key = tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    if key not in _DIGESTS:  # unchanged files (same size and mtime) are not read again
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes())
        _DIGESTS.clear()
        _DIGESTS[key] = digest.hexdigest()[:16]
    return _DIGESTS[key]


def _stamp(packages: tuple[str, ...], project: Path = ROOT) -> str:
    lock = project / LOCK
    lock_bytes = lock.read_bytes() if lock.is_file() else b""
    packages_hash = hashlib.sha256("\n".join(packages).encode() + lock_bytes).hexdigest()[:16]
    return f"{packages_hash}-{_client_digest(project)}"


def _read_stamp(path: Path) -> str:
    stamp = path / ".spe-runtime"
    return stamp.read_text().strip() if stamp.is_file() else ""


def is_built(path: Path, project: Path = ROOT) -> bool:
    return _read_stamp(path) == _stamp(PACKAGES, project)


def check_current(path: Path, project: Path = ROOT) -> None:
    """Raise :class:`~workspaces.errors.StaleRuntime` unless the runtime at ``path`` holds the
    project's current code and packages."""
    from workspaces.errors import StaleRuntime

    if not is_built(path, project):
        raise StaleRuntime(
            "The workspace runtime is older than the code that runs inside the sandbox; the "
            f"operator rebuilds it with: python -m workspaces.runtime build {path}")


def ensure_current(path: Path, project: Path = ROOT) -> bool:
    """Bring the runtime at ``path`` up to the project's code before a sandbox starts.

    Returns True when the project's code was reinstalled (it had changed), False when it was
    current. A changed package list is not installed here (it needs the package index and
    minutes): that raises :class:`~workspaces.errors.StaleRuntime` for the operator. Two
    starters never reinstall at once (a lock file beside the runtime)."""
    from workspaces.errors import StaleRuntime

    path = path.resolve()
    if is_built(path, project):
        return False
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(path, project):
            return False
        if _read_stamp(path).split("-")[0] != _stamp(PACKAGES, project).split("-")[0]:
            raise StaleRuntime(
                "The workspace runtime's packages differ from the project's; the operator "
                f"rebuilds it with: python -m workspaces.runtime build {path}")
        build(path, project=project)
        return True


def install_locked(python: Path | str, lock: Path, *, report_dir: Path | None = None,
                   pip_args: Sequence[str] = ()) -> None:
    """Install every requirement of the hashed ``lock`` with ``python``'s pip, refusing any
    file whose hash the lock does not list (``--require-hashes``); ``pip_args`` adds options
    (e.g. ``--no-index --find-links DIR``). Raises CalledProcessError on a refusal."""
    argv = [str(python), "-m", "pip", "install", "-q", "--require-hashes", "-r", str(lock)]
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--report", str(report_dir / f"{time.time_ns()}.json")]
    subprocess.run([*argv, *pip_args], check=True)


def build(path: Path, *, constraints: Path | None = None, project: Path = ROOT) -> Path:
    """Create or update the runtime at ``path``; returns ``path``. Packages come from the hashed
    lock (``constraints`` names another lock, for tests)."""
    path = path.resolve()
    if is_built(path, project):
        return path
    if not (path / "bin" / "python").exists():
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(path)], check=True)
    packages_part = _stamp(PACKAGES, project).split("-")[0]
    if _read_stamp(path).split("-")[0] == packages_part:
        _install_project(path, project)  # only the project's code changed
        (path / ".spe-runtime").write_text(_stamp(PACKAGES, project) + "\n")
        return path
    # The runtime is built from the system Python, whose version may differ from the SPE's
    # own interpreter, so it has its own lock (resolved for that Python by scripts/lock.sh).
    lock = constraints if constraints is not None else project / LOCK
    install_locked(path / "bin" / "python", lock, report_dir=path / ".spe-install-reports")
    _install_project(path, project)
    (path / ".spe-runtime").write_text(_stamp(PACKAGES, project) + "\n")
    return path


def _install_project(path: Path, project: Path) -> None:
    # Built by this interpreter with its own (locked) setuptools: no build environment is
    # fetched from the package index, whose files no lock would check.
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", wheels, str(project)], check=True)
        subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                        "--force-reinstall", *map(str, Path(wheels).glob("*.whl"))],
                       check=True)
    for config, text in ((IPYTHON_CONFIG, IPYTHON_CONFIG_TEXT),
                         (SERVER_CONFIG, SERVER_CONFIG_TEXT)):
        (path / config).parent.mkdir(parents=True, exist_ok=True)
        (path / config).write_text(text)
    built = project / LABEXTENSION_BUILD
    target = path / "share" / "jupyter" / "labextensions" / LABEXTENSION_NAME
    if (built / "package.json").is_file():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(built, target)
    subprocess.run(helpers.argv("chmod", "-R", "a+rX,go-w", str(path)), check=True,
                   env=dict(helpers.HELPER_ENV))


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "build":
        sys.exit("usage: python -m workspaces.runtime build [DIR]")
    print(build(Path(args[1] if len(args) > 1 else "var/runtime")))
