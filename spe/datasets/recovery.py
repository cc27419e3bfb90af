"""Crash recovery for ingest: a per-dataset lock and the sweep of what a killed ingest left.

An ingest builds ``.NAME.<hex>.tmp.duckdb`` (plus DuckDB's ``.wal`` and a ``.spill`` directory)
in the store, renames it to ``NAME.duckdb`` and commits the registry row in one transaction.
A process killed part-way leaves temporary files (the rename-to-commit window is a few
statements; a final file it might leave is refused, never overwritten). Every
ingest holds an exclusive ``flock`` on ``dataset-NAME.lock`` (in ``<data_dir>/locks``, outside
the store) for its whole run, so whoever holds that lock while the registry has no row for
NAME knows that every temporary file of NAME in the store is a leftover of a dead ingest and
may remove it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from spe.errors import Conflict


@contextlib.contextmanager
def ingest_lock(locks: Path, name: str) -> Iterator[None]:
    """Hold the ingest lock of ``name`` (a file in ``locks``); Conflict when another ingest
    of it is running."""
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = locks / f"dataset-{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"an ingest of dataset {name!r} is already running") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def leftovers(store: Path, name: str) -> list[Path]:
    """Temporary files and directories of ``name`` in the store. A final ``NAME.duckdb``
    without a registry row is never touched (ingest refuses to overwrite it instead)."""
    return sorted(p for pattern in (f".{name}.*.tmp*", f"..{name}.*.tmp*")
                  for p in store.glob(pattern))


def sweep(store: Path, name: str) -> list[str]:
    """Remove the leftovers of ``name`` (call only while holding its lock and with no registry
    row for it). Returns the removed names (for the audit log)."""
    removed = []
    for path in leftovers(store, name):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path.name)
    return removed
