"""Admission control of workspace disks (issue 10, item 5): home images are pre-allocated, so
the quotas of all workspaces can never add up to more than the disk holds, and a start whose
image does not fit the free space is refused with a clear message, creating nothing.

The workspaces live on a small tmpfs made for the test (so "the disk is full" is real and
harmless). Control: a sparse file of the same size, as the images used to be, is accepted by
the same filesystem without complaint: that is the overcommit the admission check prevents.
Needs root, loop devices, bubblewrap and e2fsprogs; everything created is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces import disk
from workspaces.errors import DiskAdmissionRefused
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

TOOLS = ("bwrap", "nft", "ip", "setpriv", "losetup", "mount", "mkfs.ext4", "resize2fs")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS)
    or not os.path.exists("/dev/loop-control"),
    reason="the disk quota needs root, loop devices, bubblewrap, nftables and e2fsprogs",
)
FS_MB = 400  # the workspaces' filesystem: RESERVE_MB (256) + room for one 100 MB image


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_MB}m", "spe-test", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        for image in mnt.rglob(disk.IMAGE_NAME):
            with contextlib.suppress(Exception):
                disk.detach(image.parent)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _provision(root: Path, disk_mb: int, person: str) -> Workspace:
    settings = WorkspaceSettings(allowed_host_ports=(), runtime_dir=Path("no-runtime"),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    return Workspace.provision(
        workspaces_dir=root / "workspaces", person=person, permit_id="P-adm",
        quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=disk_mb), settings=settings,
        ws_id=f"t{uuid.uuid4().hex[:11]}", with_network=False)


def test_images_are_preallocated_and_overcommit_is_refused(small_fs: Path) -> None:
    first = _provision(small_fs, 100, "alice")
    try:
        assert first.disk is not None
        image = first.disk.image
        # pre-allocated: every block of the 100 MB is held on the filesystem now.
        assert disk.allocated_bytes(image) >= 100 * disk.MIB
        with pytest.raises(DiskAdmissionRefused, match=r"100 MB does not fit.*MB free"):
            _provision(small_fs, 100, "bob")
        # nothing of the refused workspace was left: no image, no directory
        leftovers = [p for p in (small_fs / "workspaces").iterdir() if p != first.root]
        assert leftovers == []
        # Control: a sparse image of the same size, as before, is accepted by the same full
        # filesystem: the overcommit the check prevents.
        sparse = small_fs / "sparse.img"
        with open(sparse, "wb") as fh:
            fh.truncate(100 * disk.MIB)
        assert sparse.stat().st_size == 100 * disk.MIB and disk.allocated_bytes(sparse) == 0
        sparse.unlink()
    finally:
        first.destroy(remove_home=True)
    # once the first workspace's data are gone, the second fits.
    second = _provision(small_fs, 100, "bob")
    second.destroy(remove_home=True)


def test_growing_an_image_is_admitted_like_a_new_one(small_fs: Path) -> None:
    ws_root = small_fs / "w"
    ws_root.mkdir()
    d = disk.attach(ws_root, size_mb=32, uid=65534, gid=65534)
    try:
        assert disk.allocated_bytes(d.image) >= 32 * disk.MIB
        disk.detach(ws_root)
        with pytest.raises(DiskAdmissionRefused):
            disk.attach(ws_root, size_mb=FS_MB, uid=65534, gid=65534)
        assert d.image.stat().st_size == 32 * disk.MIB  # unchanged
        grown = disk.attach(ws_root, size_mb=64, uid=65534, gid=65534)
        assert grown.size_mb == 64 and disk.allocated_bytes(d.image) >= 64 * disk.MIB
    finally:
        disk.detach(ws_root)
