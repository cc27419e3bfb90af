"""Programs the enclave runs as root, found only in the system's own directories.

Contract:

* :func:`tool` returns the absolute path of a helper (``ip``, ``nft``, ``mount``, ``useradd``,
  ``bwrap``...) looked up in :data:`FIXED_PATH` alone, never in the caller's ``PATH``: a
  directory a workspace (or anyone but root) can write is never searched. A helper missing
  there raises :class:`HelperMissing`.
* :func:`run` runs a helper by that absolute path with :data:`HELPER_ENV` as its whole
  environment (fixed ``PATH``, C locale): nothing of the hub's or a sandbox's environment
  (``LD_PRELOAD``, ``PATH``, locale files...) reaches a root helper.
* Commands run *inside* a sandbox get the sandbox's own environment
  (:func:`workspaces.sandbox.sandbox_env`); the root-side wrappers around them (``sh``,
  ``nsenter``, ``bwrap``, ``setpriv``) are called by absolute path too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache

#: The only directories root helpers are taken from (root-owned system directories).
FIXED_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
HELPER_ENV = {"PATH": FIXED_PATH, "LC_ALL": "C", "LANG": "C"}


class HelperMissing(RuntimeError):
    """A program the enclave needs is not installed in the system's directories."""


@cache
def tool(name: str) -> str:
    """Absolute path of ``name`` in :data:`FIXED_PATH`; raises HelperMissing."""
    if os.sep in name:
        raise ValueError(f"a helper is named, not given by path: {name!r}")
    found = shutil.which(name, path=FIXED_PATH)
    if found is None:
        raise HelperMissing(f"{name} is not installed (looked in {FIXED_PATH})")
    return found  # the link itself: some helpers act on the name they are called by


def argv(*command: str) -> list[str]:
    """``command`` with its program replaced by the helper's absolute path."""
    return [tool(command[0]), *command[1:]]


def run(*command: str, input_text: str | None = None,
        timeout: float | None = 120) -> subprocess.CompletedProcess[str]:
    """Run a helper (absolute path, fixed environment); the caller checks ``returncode``."""
    return subprocess.run(argv(*command), capture_output=True, text=True, input=input_text,
                          check=False, env=dict(HELPER_ENV), timeout=timeout)
