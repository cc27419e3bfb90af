"""Disk quota of a workspace home (DESIGN §6: limits on CPU, memory, disk), enforced by the
kernel: the home (and the sandbox's /tmp) is an ext4 image of the permit's ``disk_mb`` mounted
through a loop device.

A write past the quota fails inside the sandbox with ENOSPC, and the same write made outside
(by the host, on the host filesystem) succeeds, so the check is real. Mounts and loop devices
are gone after destroy, also when provisioning fails half-way. Needs root, bubblewrap, nftables,
iproute2, util-linux and e2fsprogs; everything created is removed even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces import accounts, disk
from workspaces.network import existing
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

TOOLS = ("bwrap", "nft", "ip", "setpriv", "losetup", "mount", "mkfs.ext4", "resize2fs")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS)
    or not os.path.exists("/dev/loop-control"),
    reason="the disk quota needs root, loop devices, bubblewrap, nftables and e2fsprogs",
)

WRITE = textwrap.dedent("""
    import json, os, sys
    path, mb = sys.argv[1], int(sys.argv[2])
    try:
        with open(path, "wb") as fh:
            for _ in range(mb):
                fh.write(b"x" * (1024 * 1024))
            fh.flush()
            os.fsync(fh.fileno())
        print(json.dumps({"ok": True}))
    except OSError as exc:
        print(json.dumps({"ok": False, "errno": exc.errno}))
    finally:
        if os.path.exists(path):
            os.unlink(path)
""")

Make = Callable[..., Workspace]


def _mounted(ws_root: Path) -> bool:
    return disk.is_mounted(ws_root / disk.MOUNT_NAME)


@pytest.fixture
def ws_settings() -> WorkspaceSettings:
    return WorkspaceSettings(allowed_host_ports=(), runtime_dir=Path("no-runtime"),
                             cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def make_ws(tmp_path: Path, ws_settings: WorkspaceSettings) -> Iterator[Make]:
    made: list[Workspace] = []
    ws_id = f"t{uuid.uuid4().hex[:11]}"

    def make(disk_mb: int = 32, **kwargs: object) -> Workspace:
        ws = Workspace.provision(
            workspaces_dir=tmp_path / "workspaces", person="alice", permit_id="P-disk",
            quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=disk_mb),
            settings=kwargs.pop("settings", ws_settings), ws_id=ws_id,  # type: ignore[arg-type]
            with_network=False)
        made.append(ws)
        return ws

    yield make
    for ws in made:
        image = ws.root / disk.IMAGE_NAME
        ws.destroy(remove_home=True)
        assert not _mounted(ws.root) and disk.loop_devices(image) == []
        assert accounts.lookup(ws.account.name) is None
        assert f"spe-{ws.ws_id}" not in existing()


def inside(ws: Workspace, path: str, mb: int) -> dict[str, object]:
    proc = ws.run(["/usr/bin/python3", "-c", WRITE, path, str(mb)], timeout=120)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def outside(path: Path, mb: int) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", WRITE, str(path), str(mb)],
                          capture_output=True, text=True, timeout=120, check=False)
    return json.loads(proc.stdout)


def test_write_past_the_quota_fails_inside_and_succeeds_outside(
        make_ws: Make, tmp_path: Path) -> None:
    ws = make_ws(disk_mb=32)
    assert ws.disk is not None and ws.disk.size_mb == 32 and _mounted(ws.root)
    assert len(disk.loop_devices(ws.disk.image)) == 1
    used, total = ws.disk.usage()
    assert total <= 32 * disk.MIB and used < 8 * disk.MIB
    home = f"/home/{ws.account.name}"
    assert outside(tmp_path / "big.bin", 48) == {"ok": True}  # the host has room for it
    assert inside(ws, f"{home}/small.bin", 8) == {"ok": True}
    assert inside(ws, f"{home}/big.bin", 48) == {"ok": False, "errno": 28}  # ENOSPC
    assert inside(ws, "/tmp/big.bin", 48) == {"ok": False, "errno": 28}  # same quota
    # the quota is the kernel's, whoever writes: the host too, through the same filesystem
    assert outside(ws.spec.home / "big.bin", 48) == {"ok": False, "errno": 28}
    assert inside(ws, f"{home}/small.bin", 8) == {"ok": True}  # freed space is usable again


def test_home_persists_resizes_and_is_released(make_ws: Make) -> None:
    ws = make_ws(disk_mb=32)
    assert ws.run(["sh", "-c", "echo kept > ~/notes.txt"]).returncode == 0
    image = ws.root / disk.IMAGE_NAME
    ws.destroy()  # the home stays for retention; mount and loop device do not
    assert not _mounted(ws.root) and disk.loop_devices(image) == [] and image.exists()
    grown = make_ws(disk_mb=64)  # an amendment raised the quota: picked up on restart
    assert grown.disk is not None and grown.disk.size_mb == 64
    assert grown.run(["cat", "notes.txt"]).stdout == "kept\n"
    assert inside(grown, f"/home/{grown.account.name}/big.bin", 48) == {"ok": True}
    assert grown.run(["sh", "-c", "head -c 40M /dev/zero > ~/keep.bin"]).returncode == 0
    grown.destroy()
    refused = make_ws(disk_mb=16)  # the data does not fit the smaller quota: old size kept
    assert refused.disk is not None
    assert (refused.disk.size_mb, refused.disk.requested_mb) == (64, 16)
    assert refused.run(["rm", "keep.bin"]).returncode == 0
    refused.destroy()
    shrunk = make_ws(disk_mb=16)
    assert shrunk.disk is not None and shrunk.disk.size_mb == 16
    assert shrunk.run(["cat", "notes.txt"]).stdout == "kept\n"
    shrunk.destroy(remove_home=True)
    assert not image.exists() and not ws.root.exists()


def test_a_plain_home_from_before_quotas_moves_into_the_image(
        make_ws: Make, tmp_path: Path) -> None:
    ws = make_ws(settings=WorkspaceSettings(
        allowed_host_ports=(), runtime_dir=Path("no-runtime"), disk_quota=False,
        cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}"))
    assert ws.disk is None and not _mounted(ws.root)
    assert ws.run(["sh", "-c", "mkdir -p a/b && echo old > a/b/f"]).returncode == 0
    ws.destroy()
    moved = make_ws(disk_mb=32)
    assert moved.disk is not None and moved.spec.home == moved.disk.home
    assert moved.run(["cat", "a/b/f"]).stdout == "old\n"
    assert not (moved.root / "home").exists()


def test_failed_provision_leaves_no_mount_or_loop_device(
        tmp_path: Path, ws_settings: WorkspaceSettings) -> None:
    # A pool overlapping the loopback route makes the network step, after the home was
    # mounted, fail: everything made before it must be undone.
    bad = WorkspaceSettings(allowed_host_ports=(9,), subnet_pool="127.0.0.0/16",
                            runtime_dir=Path("no-runtime"),
                            cgroup_parent=ws_settings.cgroup_parent)
    ws_id = f"t{uuid.uuid4().hex[:11]}"
    root = tmp_path / "workspaces" / ws_id
    try:
        with pytest.raises(RuntimeError, match="overlaps"):
            Workspace.provision(workspaces_dir=tmp_path / "workspaces", person="alice",
                                permit_id="P-x", quota=ComputeQuota(disk_mb=32),
                                settings=bad, ws_id=ws_id)
        assert not _mounted(root)
        assert disk.loop_devices(root / disk.IMAGE_NAME) == []
        assert accounts.lookup(accounts.account_name(ws_id)) is None
    finally:
        disk.detach(root)
        if accounts.lookup(accounts.account_name(ws_id)):
            accounts.delete_account(accounts.account_name(ws_id))


def test_detach_frees_a_busy_mount_lazily(make_ws: Make) -> None:
    ws = make_ws(disk_mb=16)
    assert ws.disk is not None
    holder = subprocess.Popen(["sleep", "300"], cwd=ws.disk.home)  # keeps the mount busy
    try:
        disk.detach(ws.root)
        assert not _mounted(ws.root)
    finally:
        holder.kill()
        holder.wait()
    deadline = 50
    while disk.loop_devices(ws.disk.image) and deadline:  # autoclear once the last user left
        deadline -= 1
        subprocess.run(["sleep", "0.1"], check=True)
    assert disk.loop_devices(ws.disk.image) == []
