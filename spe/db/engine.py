"""Engine creation and the two kinds of transaction the SPE uses.

* ``db.read()``: a plain transaction for reads.
* Durability: SQLite runs in WAL mode with ``synchronous=FULL``; PostgreSQL with its durable
  defaults (``fsync``, ``synchronous_commit``), which a test checks.
* ``db.write()``: a transaction that holds the write lock from its first statement. On SQLite
  this is ``BEGIN IMMEDIATE`` (so read-then-write sequences such as budget reservation and the
  audit hash chain can never interleave); on PostgreSQL callers lock rows explicitly
  (``SELECT ... FOR UPDATE``), which the helpers in ``spe.audit`` and ``spe.budget`` do.
* ``db.read_one(select, params)``: the first row of ONE ``SELECT`` for hot read paths, as the
  driver returns it (SQLite: datetimes as text, JSON as text; PostgreSQL: objects), without
  SQLAlchemy's result machinery and without BEGIN/COMMIT: a single statement is its own
  consistent snapshot on both databases (SQLite autocommit, PostgreSQL autocommit under READ
  COMMITTED), so the answer is what a ``db.read()`` transaction holding only that statement
  would see, committed data only. SQLite uses the engine's own pool; PostgreSQL a small
  autocommit pool of its own without pre-ping and without a rollback on return (one round
  trip per read, where a pooled transaction adds the pre-ping, BEGIN and COMMIT), where a
  connection found dead is invalidated and the read retried once on a fresh one (the
  statement is a read, so a retry changes nothing).
* Pools (PostgreSQL): the main engine keeps ``pool_size`` 10 + ``max_overflow`` 20 per
  process (the API's thread pool runs at most 40 routes at once; the event-loop reads use the
  read pool, ``READ_POOL_SIZE``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

_IMMEDIATE = "spe_sqlite_immediate"
#: Connections of the PostgreSQL autocommit pool behind ``Database.read_one`` (per process;
#: reads on the event loop use one at a time, the rest serve reads from worker threads).
READ_POOL_SIZE = 4
READ_POOL_OVERFLOW = 8


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
        self._read_engine: Engine | None = None
        self._compiled: dict[int, tuple[ClauseElement, str, tuple[str, ...] | None]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception."""
        with self._writer() as session, session.begin():
            yield session

    def read_one(self, statement: ClauseElement, params: Mapping[str, Any]
                 ) -> Sequence[Any] | None:
        """The first row of ``statement`` (one SELECT) with ``params``, driver values.

        See the module docstring: one statement, no explicit transaction, committed data.
        """
        sql, order = self._sql(statement)
        args: Any = tuple(params[name] for name in order) if order is not None else params
        engine = self._reads()
        for attempt in (1, 2):
            raw = engine.raw_connection()
            cursor = None
            try:
                cursor = raw.cursor()
                cursor.execute(sql, args)
                row: Sequence[Any] | None = cursor.fetchone()
                cursor.close()
                return row
            except engine.dialect.loaded_dbapi.Error as exc:
                if attempt == 2 or not engine.dialect.is_disconnect(
                        exc, raw.dbapi_connection, cursor):
                    raise
                raw.invalidate(exc)  # dead connection: drop it and retry on a fresh one
            finally:
                raw.close()
        raise AssertionError("unreachable")

    def _sql(self, statement: ClauseElement) -> tuple[str, tuple[str, ...] | None]:
        """``statement`` compiled once for this dialect: (SQL, positional parameter names, or
        None where the driver takes named parameters)."""
        hit = self._compiled.get(id(statement))
        if hit is not None and hit[0] is statement:
            return hit[1], hit[2]
        compiled = statement.compile(dialect=self.engine.dialect)
        assert isinstance(compiled, SQLCompiler)
        order = tuple(compiled.positiontup or ()) if compiled.positional else None
        with self._lock:
            self._compiled[id(statement)] = (statement, str(compiled), order)
        return str(compiled), order

    def _reads(self) -> Engine:
        if self.is_sqlite:
            return self.engine
        if self._read_engine is None:
            with self._lock:
                if self._read_engine is None:
                    # Autocommit and single SELECTs: a connection never holds a
                    # transaction, so none is rolled back when it returns to the pool.
                    self._read_engine = create_engine(
                        self.url, isolation_level="AUTOCOMMIT", pool_pre_ping=False,
                        pool_reset_on_return=None, pool_size=READ_POOL_SIZE,
                        max_overflow=READ_POOL_OVERFLOW)
        return self._read_engine

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        from spe.db.migrate import upgrade

        upgrade(self)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._read_engine is not None:
            self._read_engine.dispose()
