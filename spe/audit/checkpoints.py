"""Signed checkpoints of the audit log: the signing keys, the checkpoint and the write-once file.

Contract
--------
* A checkpoint commits to the whole log at one moment: ``size`` (entries), ``chain_head`` (the
  hash of entry ``size``), ``root`` (the RFC 9162 Merkle root over every entry, see
  ``spe.audit.canonical``), ``permits_root``/``permits`` (a Merkle tree over one leaf per permit:
  its entry count and last entry, so an access body can tell that none of its permit's entries
  is withheld), ``time`` and ``origin``. It is signed with Ed25519 over its canonical JSON.
* The signing key lives outside the control database: ``<data_dir>/audit/keys/<key_id>.pem``
  (mode 0600, in a 0700 directory). ``<data_dir>/audit/keys.json`` publishes every public key
  with its validity (``valid_from``, ``valid_until``; the current key has none). ``rotate`` ends
  the current key's validity and creates the next; old public keys stay published so old
  checkpoints keep verifying.
* Checkpoints are appended, one JSON line each, to ``<data_dir>/audit/checkpoints.jsonl``, opened
  append-only and fsynced; no code path rewrites or truncates it. Before signing, the new tree is
  checked against the last checkpoint of that file (same prefix: a consistency check computed
  from the entries): a log rewritten or truncated since is refused with :class:`LogTampered`
  instead of being signed over.
* Every access body fetches checkpoints through the API (``spe.audit.api``) and keeps them: a
  later rewrite of the database cannot match a checkpoint it holds.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spe.audit.canonical import GENESIS_HASH
from spe.audit.merkle import leaf_hash

CHECKPOINT_VERSION = 1


class LogTampered(Exception):
    """The log no longer extends a checkpoint already signed."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    chain_head: str
    root: str
    permits: int
    permits_root: str
    time: str
    key_id: str
    signature: str = ""
    version: int = CHECKPOINT_VERSION

    def body(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("signature")
        return out

    def signed_bytes(self) -> bytes:
        return json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(origin=str(data["origin"]), size=int(data["size"]),
                   chain_head=str(data["chain_head"]), root=str(data["root"]),
                   permits=int(data["permits"]), permits_root=str(data["permits_root"]),
                   time=str(data["time"]), key_id=str(data["key_id"]),
                   signature=str(data.get("signature", "")),
                   version=int(data.get("version", CHECKPOINT_VERSION)))


def permit_leaf(permit_id: str, count: int, last_seq: int) -> bytes:
    """The Merkle leaf of one permit in a checkpoint's permits tree."""
    body = json.dumps({"permit_id": permit_id, "count": count, "last_seq": last_seq},
                      sort_keys=True, separators=(",", ":")).encode()
    return leaf_hash(body)


# Keys -------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    public_key: str  # base64 of the 32 raw bytes
    valid_from: str
    valid_until: str | None = None
    algorithm: str = "Ed25519"


class KeyStore:
    """Ed25519 checkpoint keys in ``<data_dir>/audit``; never in the control database."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "audit"
        self.keys_dir = self.dir / "keys"
        self.register = self.dir / "keys.json"

    def public_keys(self) -> list[PublicKey]:
        if not self.register.is_file():
            return []
        return [PublicKey(**k) for k in json.loads(self.register.read_text())["keys"]]

    def _write_register(self, keys: list[PublicKey]) -> None:
        tmp = self.register.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as fh:
            json.dump({"keys": [asdict(k) for k in keys]}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.register)

    def _make_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys_dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.keys_dir, 0o700)

    def current(self) -> tuple[str, Ed25519PrivateKey]:
        """The current signing key (created on first use)."""
        keys = [k for k in self.public_keys() if k.valid_until is None]
        if not keys:
            return self.rotate()
        key_id = keys[-1].key_id
        path = self.keys_dir / f"{key_id}.pem"
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError("the audit signing key file must not be readable by others "
                                  "(mode 0600)")
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError("the audit signing key is not an Ed25519 key")
        return key_id, private

    def rotate(self) -> tuple[str, Ed25519PrivateKey]:
        """End the current key's validity and start a new one; returns the new key."""
        self._make_dirs()
        private = Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
        key_id = hashlib.sha256(raw).hexdigest()[:16]
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        path = self.keys_dir / f"{key_id}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        now = _now()
        keys = [k if k.valid_until is not None else
                PublicKey(k.key_id, k.public_key, k.valid_from, now, k.algorithm)
                for k in self.public_keys()]
        keys.append(PublicKey(key_id, _b64(raw), now))
        self._write_register(keys)
        return key_id, private


# The write-once file ------------------------------------------------------------------------

_local = threading.local()
_thread_lock = threading.RLock()


class CheckpointLog:
    """``<data_dir>/audit/checkpoints.jsonl``: appended to, never rewritten."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "audit" / "checkpoints.jsonl"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise checkpoint creation (threads and processes), so checkpoints are appended
        in the order of their sizes. Re-entrant within a thread."""
        with _thread_lock:
            depth = getattr(_local, "depth", 0)
            _local.depth = depth + 1
            try:
                if depth:
                    yield
                    return
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(self.path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    yield
                finally:
                    os.close(fd)
            finally:
                _local.depth = depth

    def append(self, checkpoint: Checkpoint) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = json.dumps(checkpoint.to_json(), sort_keys=True, separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def all(self) -> list[Checkpoint]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                out.append(Checkpoint.from_json(json.loads(line)))
        return out

    def last(self) -> Checkpoint | None:
        found = self.all()
        return found[-1] if found else None

    def at_size(self, size: int) -> Checkpoint | None:
        for cp in reversed(self.all()):
            if cp.size == size:
                return cp
        return None


def sign(body: Checkpoint, private: Ed25519PrivateKey) -> Checkpoint:
    signature = private.sign(body.signed_bytes())
    return Checkpoint(**{**body.to_json(), "signature": _b64(signature)})


def empty_chain_head() -> str:
    return GENESIS_HASH
