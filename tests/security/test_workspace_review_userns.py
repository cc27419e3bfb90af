"""A workspace must not create user namespaces: inside one it would hold every capability over
new mount, network and cgroup namespaces (mount tricks, raw sockets, kernel code unprivileged
users otherwise never reach). The same unprivileged account can do it outside the sandbox, so
the check is real. Needs root and bubblewrap; everything created is removed even on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces import seccomp
from workspaces.errors import UnsupportedArchitecture
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv",
                                                           "unshare")),
    reason="the sandbox needs root, bubblewrap, nftables, iproute2, setpriv and unshare",
)

ATTEMPTS = {
    "unshare -U": "unshare -Ur id -u",
    "userns + mount": "unshare -Urm sh -c 'mount -t tmpfs none /usr && echo mounted'",
    "userns + netns": "unshare -Urn sh -c 'echo netns'",
    "clone(CLONE_NEWUSER)": "python3 -c \"import ctypes, os; libc = ctypes.CDLL(None); "
                            "pid = libc.syscall(56 if os.uname().machine == 'x86_64' else 220, "
                            "0x10000000 | 17, 0, 0, 0, 0); "
                            "os._exit(0) if pid == 0 else None; "
                            "assert pid > 0; os.waitpid(pid, 0); print('cloned')\"",
}


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    w = Workspace.provision(
        workspaces_dir=tmp_path / "var" / "workspaces", person="mallory", permit_id="P-1",
        quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=64), settings=settings,
        with_network=False, ws_id=f"t{uuid.uuid4().hex[:11]}")
    try:
        yield w
    finally:
        w.destroy(remove_home=True)


@pytest.mark.parametrize("name", list(ATTEMPTS))
def test_no_user_namespaces_inside(ws: Workspace, name: str) -> None:
    attempt = ATTEMPTS[name]
    host = subprocess.run(
        ["setpriv", f"--reuid={ws.account.uid}", f"--regid={ws.account.gid}", "--clear-groups",
         "--no-new-privs", "sh", "-c", attempt], capture_output=True, text=True, timeout=30,
        check=False, cwd="/")
    if host.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are off on this host: {host.stderr}")
    inside = ws.run(["sh", "-c", attempt])
    assert inside.returncode != 0, inside.stdout
    assert inside.stdout.strip() == ""


def test_sandbox_still_forks_threads_and_runs_python(ws: Workspace) -> None:
    out = ws.run(["python3", "-c", "import subprocess, threading; "
                  "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join(); "
                  "print(subprocess.run(['echo', 'child'], capture_output=True, text=True)"
                  ".stdout.strip())"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["thread", "child"]


def test_program_refuses_other_abis_and_unknown_machines() -> None:
    assert seccomp.program("x86_64") != seccomp.program("aarch64")
    with pytest.raises(UnsupportedArchitecture):
        seccomp.program("sparc")
