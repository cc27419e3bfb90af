"""Engine creation and the two kinds of transaction the SPE uses.

* ``db.read()``: a plain transaction for reads.
* Durability: SQLite runs in WAL mode with ``synchronous=FULL``; PostgreSQL with its durable
  defaults (``fsync``, ``synchronous_commit``), which a test checks.
* ``db.write()``: a transaction that holds the write lock from its first statement. On SQLite
  this is ``BEGIN IMMEDIATE`` (so read-then-write sequences such as budget reservation and the
  audit hash chain can never interleave); on PostgreSQL callers lock rows explicitly
  (``SELECT ... FOR UPDATE``), which the helpers in ``spe.audit`` and ``spe.budget`` do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

_IMMEDIATE = "spe_sqlite_immediate"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys, a busy timeout and explicit BEGINs."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Private to the service: SQLite gives its -wal/-shm files the database's mode.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            for file in (path, path.with_name(path.name + "-wal"),
                         path.with_name(path.name + "-shm")):
                if file.exists() and file.stat().st_uid == os.getuid():
                    os.chmod(file, 0o600)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # FULL: a commit (an act and its audit entry) survives a power loss, not only a
            # crash of the process (NORMAL in WAL mode may lose the last commits).
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            immediate = conn.get_execution_options().get(_IMMEDIATE, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


class Database:
    """The control-plane database of one SPE installation."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        writer_engine = (
            self.engine.execution_options(**{_IMMEDIATE: True}) if self.is_sqlite else self.engine
        )
        self._writer = sessionmaker(writer_engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception."""
        with self._writer() as session, session.begin():
            yield session

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        from spe.db.migrate import upgrade

        upgrade(self)

    def dispose(self) -> None:
        self.engine.dispose()
