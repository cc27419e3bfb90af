"""Quarantine: where exported files' bytes wait, owned by the service.

Files live under ``<data_dir>/airlock/quarantine/<request id>/<file id>``: directories 0700,
files written once (``O_EXCL``, no links followed) and made read-only (0400). Ids are
server-made hex strings, never names chosen by the researcher.

An upload is streamed into a :class:`Staged` file (``<file id>.part`` beside its final name)
while it is hashed and counted; the caller records it in the database and only after the commit
calls :meth:`Staged.publish` (fsync, 0400, then linked under the final name, which it never
replaces). A failed or cut-off upload calls :meth:`Staged.discard`, so no orphan stays.
:meth:`Quarantine.sweep` (run at start) finishes what a crash interrupted: a ``.part`` file
whose id the database knows is published, any other one (older than a grace period, so uploads
in flight in another process are left alone) is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_ID = re.compile(r"^[0-9a-f]{32}$")
_PART = ".part"
CHUNK = 1 << 20


class Staged:
    """One upload being written: bytes are appended, hashed and counted as they arrive."""

    def __init__(self, path: Path, final: Path, limit: int) -> None:
        self.path, self.final, self.limit = path, final, limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raises :class:`OverflowError` once the total passes ``limit``
        (nothing past the limit is written)."""
        if self._fd is None:
            raise ValueError("the staged file is closed")
        if self.size + len(chunk) > self.limit:
            raise OverflowError(self.limit)
        self._hash.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]
        self.size += len(chunk)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def seal(self) -> None:
        """All bytes are in: flush them to disk and make the file read-only (still staged)."""
        if self._fd is not None:
            os.fsync(self._fd)
        self._close()
        os.chmod(self.path, 0o400)

    def publish(self) -> None:
        """Give the sealed file its final name (after the database commit)."""
        self.seal()
        _place(self.path, self.final)

    def discard(self) -> None:
        self._close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _place(part: Path, final: Path) -> None:
    """Give ``part`` the name ``final``, never replacing a file (write once)."""
    os.link(part, final, follow_symlinks=False)  # FileExistsError if it exists
    part.unlink()
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Quarantine:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, request_id: str, file_id: str) -> Path:
        if not (_ID.match(request_id) and _ID.match(file_id)):
            raise ValueError("quarantine ids are 32 hex characters")
        return self.root / request_id / file_id

    def path(self, request_id: str, file_id: str) -> Path:
        """Where a published file lives (it may not exist)."""
        return self._path(request_id, file_id)

    def stage(self, request_id: str, file_id: str, limit: int) -> Staged:
        """A new staged file for an upload of at most ``limit`` bytes."""
        final = self._path(request_id, file_id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        return Staged(final.with_name(final.name + _PART), final, limit)

    def put(self, request_id: str, file_id: str, data: bytes) -> None:
        staged = self.stage(request_id, file_id, len(data))
        try:
            staged.write(data)
            staged.publish()
        except BaseException:
            staged.discard()
            raise

    def get(self, request_id: str, file_id: str) -> bytes:
        fd = os.open(self._path(request_id, file_id), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def chunks(self, request_id: str, file_id: str) -> Iterator[bytes]:
        """The file's bytes in chunks (for downloads: never the whole file in memory)."""
        fd = os.open(self._path(request_id, file_id), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def digest(self, request_id: str, file_id: str) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks(request_id, file_id):
            h.update(chunk)
        return h.hexdigest()

    def exists(self, request_id: str, file_id: str) -> bool:
        return self._path(request_id, file_id).exists()

    def remove(self, request_id: str, file_id: str) -> bool:
        """Delete a file (True when there was one)."""
        try:
            self._path(request_id, file_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def prune(self, request_id: str) -> None:
        """Remove a finished request's folder when it holds nothing any more."""
        folder = self._path(request_id, "0" * 32).parent
        with contextlib.suppress(OSError):
            folder.rmdir()

    def sweep(self, known: Callable[[str, str], bool], grace_seconds: float = 3600.0
              ) -> tuple[int, int]:
        """Finish interrupted uploads: publish ``.part`` files the database knows
        (``known(request_id, file_id)``), delete the others not touched for
        ``grace_seconds``. Returns (published, deleted)."""
        published = deleted = 0
        if not self.root.is_dir():
            return 0, 0
        now = time.time()
        for part in sorted(self.root.glob(f"*/*{_PART}")):
            request_id, file_id = part.parent.name, part.name[:-len(_PART)]
            if not (_ID.match(request_id) and _ID.match(file_id)) or part.is_symlink():
                continue
            final = part.with_name(file_id)
            if known(request_id, file_id) and not final.exists():
                os.chmod(part, 0o400)
                _place(part, final)
                published += 1
            elif now - part.stat().st_mtime >= grace_seconds:
                part.unlink()
                deleted += 1
        return published, deleted
