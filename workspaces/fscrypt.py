"""Encryption at rest of workspace disk images: ext4's native encryption (fscrypt, v2 policies).

Contract:

* :func:`workspace_key` derives a workspace's 64-byte key from the master key file (HKDF-SHA512
  with the workspace id as info; :func:`derive_key` for other purposes), so one file outside
  the data directory unlocks every image and no per-workspace key is stored anywhere. The
  master file is refused when group or others may access it, or holds fewer than 32 bytes.
* :func:`add_key` adds a key to a mounted filesystem's keyring (``FS_IOC_ADD_ENCRYPTION_KEY``)
  and returns its 16-byte identifier. The kernel drops the keyring when the filesystem is
  unmounted, so a detached image holds only ciphertext (file contents and names, AES-256-XTS
  and AES-256-CTS) and its key is nowhere on disk.
* :func:`set_policy` puts an *empty* directory under the key (``FS_IOC_SET_ENCRYPTION_POLICY``):
  everything created below it later is encrypted. :func:`policy_identifier` reads a directory's
  key identifier back (``None``: not encrypted).

Requires root (or CAP_SYS_ADMIN for the keyring) and an ext4 filesystem with the ``encrypt``
feature (``mkfs.ext4 -O encrypt`` or ``tune2fs -O encrypt``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 64  # AES-256-XTS
_SPEC_IDENTIFIER = 2  # FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
_MODE_AES_256_XTS, _MODE_AES_256_CTS = 1, 4
_POLICY_FLAGS_PAD_32 = 3
_ADD_ARG = struct.Struct("=II32sII32s")  # key_spec (type, reserved, u), raw_size, key_id, rsvd
_POLICY_V2 = struct.Struct("=BBBBB3s16s")


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("f") << 8) | nr


FS_IOC_ADD_ENCRYPTION_KEY = _ioc(3, 23, _ADD_ARG.size)  # _IOWR('f', 23, 80 bytes)
FS_IOC_SET_ENCRYPTION_POLICY = _ioc(2, 19, 12)  # _IOR('f', 19, struct fscrypt_policy_v1)
FS_IOC_GET_ENCRYPTION_POLICY_EX = _ioc(3, 22, 9)  # _IOWR('f', 22, __u8[9])


class KeyFileRefused(ValueError):
    """The master key file is missing, too short, or others may access it."""


def workspace_key(master_file: Path, workspace_id: str) -> bytes:
    """The key of ``workspace_id``'s disk image, derived from the master key file."""
    return derive_key(master_file, workspace_id)


def derive_key(master_file: Path, purpose: str) -> bytes:
    """A 64-byte key for ``purpose`` (a workspace id, or ``data:<name>`` for a data folder)."""
    try:
        st = master_file.stat()
        data = master_file.read_bytes()
    except OSError as exc:
        raise KeyFileRefused(f"{master_file} cannot be read") from exc
    if st.st_mode & 0o077:
        raise KeyFileRefused(f"{master_file} may be accessed by group or others (chmod 0600)")
    if len(data.strip()) < 32:
        raise KeyFileRefused(f"{master_file} holds fewer than 32 bytes")
    hkdf = HKDF(algorithm=hashes.SHA512(), length=KEY_BYTES, salt=b"spe-workspace-disk",
                info=purpose.encode())
    return hkdf.derive(data.strip())


def add_key(mountpoint: Path, key: bytes) -> bytes:
    """Add ``key`` to the keyring of the filesystem mounted at ``mountpoint``; its identifier."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"an fscrypt key here has {KEY_BYTES} bytes")
    arg = bytearray(_ADD_ARG.pack(_SPEC_IDENTIFIER, 0, b"", len(key), 0, b"") + key)
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg, True)
    finally:
        os.close(fd)
    arg[_ADD_ARG.size:] = bytes(len(key))  # no copy of the key left in this buffer
    return bytes(arg[8:24])


def set_policy(directory: Path, identifier: bytes) -> None:
    """Encrypt everything later created in the empty ``directory`` under ``identifier``."""
    policy = _POLICY_V2.pack(2, _MODE_AES_256_XTS, _MODE_AES_256_CTS, _POLICY_FLAGS_PAD_32, 0,
                             b"", identifier)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, policy)
    finally:
        os.close(fd)


def policy_identifier(directory: Path) -> bytes | None:
    """The key identifier of ``directory``'s v2 policy, or ``None`` when it is not encrypted."""
    buf = bytearray(struct.pack("=Q", _POLICY_V2.size) + bytes(_POLICY_V2.size))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTTY, errno.EOPNOTSUPP):
            return None
        raise
    finally:
        os.close(fd)
    return bytes(buf[8 + 8:8 + 24]) if buf[8] == 2 else None
