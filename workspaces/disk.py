"""Per-workspace disk quota: the home is its own ext4 filesystem, in an image file.

Contract:

* :func:`attach` makes ``<workspace>/home.img`` (a file of the permit's
  ``ComputeQuota.disk_mb``, *pre-allocated*, never sparse: every block is reserved on the
  workspaces' own filesystem when the image is made or grown, so quotas can never add up to
  more than the disk holds; formatted ext4 with no reserved blocks and without discards, which
  would punch holes back into it) and mounts it on
  ``<workspace>/disk`` through a loop device with ``nosuid,nodev``. The filesystem's root is
  root's (0755), so the workspace cannot rename or replace what it holds: ``home/`` (the
  workspace's home, its account's, 0700) and ``tmp/`` (the sandbox's ``/tmp``, emptied on every
  attach). Both count against the one quota, enforced by the kernel: a write past it fails with
  ``ENOSPC`` inside the sandbox and outside alike, and nothing else on the host fills up.
* Admission: before an image is made or grown, the blocks it still needs are compared with the
  free space of the filesystem holding it (less :data:`RESERVE_MB` kept for the host);
  when they do not fit, :class:`~workspaces.errors.DiskAdmissionRefused` says how much was
  asked and how much is free, and nothing is created or changed.
* The image outlives the mount: it *is* the home's persistent storage (kept for the retention
  period like a plain home, deleted with the workspace directory). A later :func:`attach`
  reuses it; when the permit's quota changed (amendment) the filesystem is grown or shrunk to the
  new size on that attach (a shrink that the data does not fit is refused and the old size kept:
  :class:`HomeDisk` says which size is in force). Files left by an earlier account of the same
  workspace (the uid can change between spawns) are handed to the current one.
* A plain ``<workspace>/home`` from before quotas is copied into a new image on first attach
  and removed (the copy must fit the quota, else the attach fails and the old home stays).
* Encryption at rest (with a key, :mod:`workspaces.fscrypt`): the image is ext4 with the
  ``encrypt`` feature and ``home/`` and ``tmp/`` are under the workspace's key, added to the
  filesystem's keyring at each mount and gone with the unmount: a detached image holds only
  ciphertext of file contents and names.
* :func:`detach` unmounts (lazily when still busy) and frees every loop device backing the
  image; idempotent, and safe to call when nothing is mounted. :func:`attach` undoes its own
  mount and loop devices when it fails.

Requires root, ``losetup``/``mount`` (util-linux) and ``mkfs.ext4``/``e2fsck``/``resize2fs``
(e2fsprogs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from workspaces import fscrypt, helpers

MIB = 1024 * 1024
IMAGE_NAME = "home.img"
MOUNT_NAME = "disk"
LEGACY_HOME = "home"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
#: Free space (MB) on the workspaces' filesystem that admission never hands to an image.
RESERVE_MB = 256


class DiskError(RuntimeError):
    """A home filesystem could not be created, resized or mounted."""


@dataclass(frozen=True)
class HomeDisk:
    """A mounted home filesystem."""

    image: Path
    mountpoint: Path
    size_mb: int  # the size in force (the quota, unless a shrink was refused)
    requested_mb: int
    encrypted: bool = False  # home/ and tmp/ under the workspace's fscrypt key

    @property
    def home(self) -> Path:
        return self.mountpoint / "home"

    @property
    def tmp(self) -> Path:
        return self.mountpoint / "tmp"

    def usage(self) -> tuple[int, int]:
        """(used, total) bytes of the home filesystem as the kernel counts them."""
        st = os.statvfs(self.mountpoint)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize


def _run(*argv: str) -> str:
    proc = helpers.run(*argv)
    if proc.returncode != 0:
        raise DiskError(f"{' '.join(argv[:3])} failed ({proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[:500]}")
    return proc.stdout


def _unescape(field: str) -> str:
    """Decode the octal escapes of /proc/self/mountinfo (spaces, tabs, newlines...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted exactly on ``path`` in this mount namespace."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as fh:
        return any(_unescape(line.split()[4]) == target for line in fh)


def loop_devices(image: Path) -> list[str]:
    """The loop devices backed by ``image`` (none once detached)."""
    if not image.exists():
        return []
    out = _run("losetup", "--noheadings", "--output", "NAME", "--associated", str(image))
    return [line.strip() for line in out.splitlines() if line.strip()]


def _fs_blocks_fit(image: Path, size_mb: int) -> None:
    check = helpers.run("e2fsck", "-f", "-y", str(image))
    if check.returncode not in (0, 1):  # 1: errors corrected
        raise DiskError(f"e2fsck {image.name} failed ({check.returncode}): "
                        f"{check.stdout.strip()[-500:]}")
    _run("resize2fs", str(image), f"{size_mb}M")


def allocated_bytes(path: Path) -> int:
    """Bytes the filesystem really holds for ``path`` (blocks, not the apparent size)."""
    return path.stat().st_blocks * 512


def admit(directory: Path, size_mb: int, *, image: Path | None = None,
          reserve_mb: int = RESERVE_MB) -> None:
    """Raise DiskAdmissionRefused unless an image of ``size_mb`` (``image`` if it exists
    already: only its missing blocks count) fits the free space of ``directory``'s
    filesystem, less ``reserve_mb``."""
    from workspaces.errors import DiskAdmissionRefused

    have = allocated_bytes(image) if image is not None and image.exists() else 0
    need = max(0, size_mb * MIB - have)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize - reserve_mb * MIB
    if need > free:
        raise DiskAdmissionRefused(
            f"The workspace disk of {size_mb} MB does not fit: it needs {need // MIB} MB more "
            f"and the workspaces' filesystem has {max(free, 0) // MIB} MB free (after "
            f"{reserve_mb} MB kept for the host). Free space on the host or lower the "
            "permit's disk quota.")


def _preallocate(image: Path, size_mb: int) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size_mb * MIB)
    finally:
        os.close(fd)


def _resize(image: Path, size_mb: int) -> int:
    """Bring the (unmounted) filesystem to ``size_mb``; return the size in force."""
    current = image.stat().st_size // MIB
    if current == size_mb:
        _preallocate(image, size_mb)  # an image from before pre-allocation: fill it in
        return current
    if size_mb > current:
        _preallocate(image, size_mb)
        _fs_blocks_fit(image, size_mb)
        return size_mb
    try:
        _fs_blocks_fit(image, size_mb)
    except DiskError:  # the data does not fit the new quota: keep the old size
        return current
    os.truncate(image, size_mb * MIB)
    return size_mb


def _format(image: Path, size_mb: int, *, encrypt: bool = False) -> None:
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size_mb * MIB)
    finally:
        os.close(fd)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-L", "spe-home",
         *(("-O", "encrypt") if encrypt else ()), "-E",
         "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(image))


def _hand_over(root: Path, uid: int, gid: int) -> None:
    """Give ``root`` and the files of an earlier account of this workspace (the uid can change
    between spawns) to the current account. Never follows symbolic links."""
    st = root.lstat()
    if (st.st_uid, st.st_gid) != (uid, gid):
        old_uid, old_gid = st.st_uid, st.st_gid
        for dirpath, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    ls = os.lstat(path)
                    if ls.st_uid == old_uid or ls.st_gid == old_gid:
                        os.lchown(path, uid if ls.st_uid == old_uid else -1,
                                  gid if ls.st_gid == old_gid else -1)
    os.lchown(root, uid, gid)
    root.chmod(0o700)


def _fresh_dir(path: Path, uid: int, gid: int) -> None:
    """An empty directory of the account at ``path`` (in a root-owned parent)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    path.mkdir(0o700)
    os.chown(path, uid, gid)
    path.chmod(0o700)


def attach(workspace_root: Path, *, size_mb: int, uid: int, gid: int,
           key: bytes | None = None) -> HomeDisk:
    """Create or reuse the workspace's home image and mount it on ``<root>/disk``.

    With ``key`` (:func:`workspaces.fscrypt.workspace_key`), the image's ``home/`` and ``tmp/``
    are encrypted with fscrypt: a new image is made so; an older image gets the ext4 feature and
    its fresh ``tmp/``, but a home that already holds files stays as it is
    (:attr:`HomeDisk.encrypted` says which)."""
    if size_mb < 8:
        raise DiskError(f"disk quota of {size_mb} MB is too small for a home filesystem")
    image = workspace_root / IMAGE_NAME
    mnt = workspace_root / MOUNT_NAME
    legacy = workspace_root / LEGACY_HOME
    detach(workspace_root)  # whatever a dead hub left mounted
    admit(workspace_root, size_mb, image=image)
    created = False
    try:
        if not image.exists():
            created = True
            _format(image, size_mb, encrypt=key is not None)
            in_force = size_mb
        else:
            in_force = _resize(image, size_mb)
        _preallocate(image, in_force)  # mkfs and resize2fs punch holes when they zero blocks
        if key is not None and not created:
            _run("tune2fs", "-O", "encrypt", str(image))  # a no-op when it has the feature
        mnt.mkdir(mode=0o700, exist_ok=True)
        mnt.chmod(0o700)
        _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(mnt))
        key_id = fscrypt.add_key(mnt, key) if key is not None else None
        os.chown(mnt, 0, 0)
        mnt.chmod(0o755)  # the fs root: root's, so home/ and tmp/ cannot be replaced
        disk = HomeDisk(image=image, mountpoint=mnt, size_mb=in_force, requested_mb=size_mb)
        if disk.home.is_symlink() or (disk.home.exists() and not disk.home.is_dir()):
            disk.home.unlink()
        fresh_home = not disk.home.exists()
        disk.home.mkdir(mode=0o700, exist_ok=True)
        if key_id is not None and fresh_home:
            fscrypt.set_policy(disk.home, key_id)
        if legacy.is_dir() and not legacy.is_symlink() and any(legacy.iterdir()):
            _run("cp", "-a", "--", f"{legacy}/.", str(disk.home))
        _hand_over(disk.home, uid, gid)
        _fresh_dir(disk.tmp, uid, gid)
        if key_id is not None:
            fscrypt.set_policy(disk.tmp, key_id)
            disk = dataclasses.replace(
                disk, encrypted=fscrypt.policy_identifier(disk.home) == key_id)
        lost = mnt / "lost+found"
        if lost.is_dir():
            lost.chmod(0o700)  # root's, for e2fsck
    except BaseException:
        with contextlib.suppress(Exception):
            detach(workspace_root)
        if created:
            image.unlink(missing_ok=True)
        raise
    if legacy.is_dir() and not legacy.is_symlink():  # copied in: the image is the home now
        shutil.rmtree(legacy)
    return disk


def detach(workspace_root: Path) -> None:
    """Unmount the workspace's home and free its loop devices. Idempotent."""
    home = workspace_root / MOUNT_NAME
    image = workspace_root / IMAGE_NAME
    errors: list[str] = []
    for _ in range(8):  # stacked mounts (never made by us, but undo them all)
        if not is_mounted(home):
            break
        proc = helpers.run("umount", str(home))
        if proc.returncode != 0:  # still busy (a process not yet reaped): detach it lazily
            lazy = helpers.run("umount", "--lazy", str(home))
            if lazy.returncode != 0:
                errors.append(lazy.stderr.strip())
                break
    for dev in loop_devices(image):
        proc = helpers.run("losetup", "--detach", dev)
        if proc.returncode != 0:
            errors.append(proc.stderr.strip())
    if errors:
        raise DiskError("; ".join(errors))
