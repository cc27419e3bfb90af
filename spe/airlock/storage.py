"""Quarantine: where exported files' bytes wait, owned by the service.

Files live under ``<data_dir>/airlock/quarantine/<request id>/<file id>``: directories 0700,
files written once (``O_EXCL``, no links followed) and made read-only (0400). Ids are
server-made hex strings, never names chosen by the researcher.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

_ID = re.compile(r"^[0-9a-f]{32}$")


class Quarantine:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, request_id: str, file_id: str) -> Path:
        if not (_ID.match(request_id) and _ID.match(file_id)):
            raise ValueError("quarantine ids are 32 hex characters")
        return self.root / request_id / file_id

    def put(self, request_id: str, file_id: str, data: bytes) -> None:
        path = self._path(request_id, file_id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(path, 0o400)

    def get(self, request_id: str, file_id: str) -> bytes:
        fd = os.open(self._path(request_id, file_id), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def remove(self, request_id: str, file_id: str) -> None:
        path = self._path(request_id, file_id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
