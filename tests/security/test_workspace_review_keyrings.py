"""Kernel keyrings are not namespaced: a key a workspace puts in its user keyring outlives the
workspace's account, and the next workspace given the same (reused) uid could read it; a
sandboxed process also possesses the session keyring it inherited from the spawner. The
sandbox refuses the keyring system calls. The same unprivileged account can use them outside
the sandbox, so the check is real. Needs root and bubblewrap; cleans up even on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip",
                                                               "setpriv")),
        reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv"),
]

KEYS = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
add_key, request_key, keyctl = {"x86_64": (248, 249, 250), "aarch64": (217, 218, 219)}[
    os.uname().machine]
USER_KEYRING, KEYCTL_READ, KEYCTL_CLEAR = -4, 11, 7
op = sys.argv[1]
out = {}
if op == "add":
    out["id"] = libc.syscall(add_key, b"user", b"spe-review", b"secret-of-A", 11, USER_KEYRING)
elif op == "read":
    key = libc.syscall(request_key, b"user", b"spe-review", None, 0)
    buf = ctypes.create_string_buffer(64)
    n = libc.syscall(keyctl, KEYCTL_READ, key, buf, 64) if key > 0 else -1
    out["value"] = buf.value[:max(n, 0)].decode() if n > 0 else None
else:
    out["id"] = libc.syscall(keyctl, KEYCTL_CLEAR, USER_KEYRING)
out["errno"] = ctypes.get_errno()
print(json.dumps(out))
"""


@pytest.fixture
def provision(tmp_path: Path) -> Iterator[object]:
    settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    made: list[Workspace] = []
    uids: set[int] = set()

    def make(person: str) -> Workspace:
        ws = Workspace.provision(
            workspaces_dir=tmp_path / "var" / "workspaces", person=person, permit_id="P-1",
            quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=64), settings=settings,
            with_network=False, ws_id=f"t{uuid.uuid4().hex[:11]}")
        made.append(ws)
        uids.add(ws.account.uid)
        return ws

    yield make
    for ws in made:
        ws.destroy(remove_home=True)
    for uid in uids:  # whatever a failed run left in the kernel's keyrings of these uids
        as_uid(uid, "clear")


def as_uid(uid: int, op: str) -> dict[str, object]:
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           "/usr/bin/python3", "-c", KEYS, op], capture_output=True, text=True,
                          timeout=30, check=False, cwd="/")
    return dict(json.loads(proc.stdout))


def inside(ws: Workspace, op: str) -> dict[str, object]:
    proc = ws.run(["python3", "-c", KEYS, op])
    return dict(json.loads(proc.stdout))


def test_keyring_calls_are_refused(provision) -> None:
    ws = provision("alice")
    outside = as_uid(ws.account.uid, "add")  # the same unprivileged uid, on the host
    assert int(str(outside["id"])) > 0
    assert as_uid(ws.account.uid, "read")["value"] == "secret-of-A"
    as_uid(ws.account.uid, "clear")
    added = inside(ws, "add")
    assert int(str(added["id"])) < 0 and added["errno"] == 1  # EPERM
    assert inside(ws, "read")["value"] is None


def test_no_key_passes_to_the_next_workspace_with_the_same_uid(provision) -> None:
    a = provision("alice")
    inside(a, "add")
    uid = a.account.uid
    a.destroy()
    b = provision("bob")
    if b.account.uid != uid:
        pytest.skip("the uid was not reused (another account took it)")
    assert inside(b, "read")["value"] is None
