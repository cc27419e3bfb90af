"""A small ext4 filesystem with the ``encrypt`` feature on a loop device, for tests of
encryption at rest (the host's own filesystem may lack the feature). Needs root, loop devices
and ext4 encryption in the kernel: :data:`REASON` says why not when :data:`AVAILABLE` is
false."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

AVAILABLE = (os.geteuid() == 0 and Path("/dev/loop-control").exists()
             and Path("/sys/fs/ext4/features/encryption").exists())
REASON = "needs root, loop devices and ext4 encryption (fscrypt) in the kernel"


@contextmanager
def fscrypt_filesystem(where: Path, size_mb: int = 64) -> Iterator[Path]:
    """Mount a fresh encrypt-capable ext4 image on ``where/fs``; unmounted (and its loop device
    freed) afterwards."""
    image, mnt = where / "fs.img", where / "fs"
    mnt.mkdir(parents=True)
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "encrypt", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def remount(where: Path) -> None:
    """Unmount and mount ``where/fs`` again: the kernel forgets every key added to it."""
    subprocess.run(["umount", str(where / "fs")], check=True)
    subprocess.run(["mount", "-o", "loop", str(where / "fs.img"), str(where / "fs")],
                   check=True)
