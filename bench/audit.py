"""Benchmark of the audit log: ``.venv/bin/python -m bench.audit [--appends N] [--entries N]``.

Prints, in one run on this machine:

1. single-commit appends per second (one ``db.write()`` transaction holding one ``record``,
   as every audited act does) on SQLite (WAL, synchronous=FULL) and on PostgreSQL
   (``SPE_TEST_POSTGRES_URL``; skipped with a note when unset), with N concurrent writers;
2. verification speed in entries per second: the SPE's ``verify_chain`` (every hash and link
   recomputed from the stored columns), the Merkle root over all entries (what a checkpoint
   costs), one permit's proofs; next to a bare SQLite hash chain (one column of bytes, one
   SHA-256 per row) written and verified in the same run, as the floor.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from spe.audit import AuditEvent, record, verify_chain
from spe.audit.checkpoints import CheckpointLog, KeyStore
from spe.audit.proofs import create_checkpoint, permit_bundle, tree_at
from spe.db import Database


def _event(i: int) -> AuditEvent:
    return AuditEvent(action="dp.query", actor=f"user{i % 50}", role="researcher",
                      permit_id=f"permit-{i % 20}", target=f"q{i}",
                      details={"sql_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
                               "epsilon": 0.1, "rows": i % 1000})


def appends_per_second(db: Database, n: int, writers: int) -> float:
    per = n // writers

    def work(w: int) -> None:
        for i in range(per):
            with db.write() as s:
                record(s, _event(w * per + i))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * writers / (time.perf_counter() - start)


def bulk_fill(db: Database, n: int, batch: int = 2000) -> None:
    """Many entries per transaction (to reach a large log quickly; same write path)."""
    done = 0
    while done < n:
        with db.write() as s:
            for i in range(done, min(n, done + batch)):
                record(s, _event(i))
        done = min(n, done + batch)


def bare_chain(path: Path, n: int) -> tuple[float, float]:
    """(single-commit appends/s, verified entries/s) of a bare SQLite hash chain."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE chain (seq INTEGER PRIMARY KEY, data BLOB, prev BLOB, h BLOB)")
    prev = b"\0" * 32
    appends = min(n, 2000)
    start = time.perf_counter()
    for i in range(appends):
        data = f'{{"actor":"user{i % 50}","action":"dp.query","i":{i}}}'.encode()
        digest = hashlib.sha256(prev + data).digest()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO chain VALUES (?, ?, ?, ?)", (i + 1, data, prev, digest))
        conn.execute("COMMIT")
        prev = digest
    append_rate = appends / (time.perf_counter() - start)
    conn.execute("BEGIN")
    for i in range(appends, n):
        data = f'{{"actor":"user{i % 50}","action":"dp.query","i":{i}}}'.encode()
        digest = hashlib.sha256(prev + data).digest()
        conn.execute("INSERT INTO chain VALUES (?, ?, ?, ?)", (i + 1, data, prev, digest))
        prev = digest
    conn.execute("COMMIT")
    start = time.perf_counter()
    prev = b"\0" * 32
    count = 0
    for _seq, data, link, digest in conn.execute("SELECT seq, data, prev, h FROM chain "
                                                 "ORDER BY seq"):
        if link != prev or hashlib.sha256(prev + data).digest() != digest:
            raise SystemExit("bare chain broken")
        prev = digest
        count += 1
    verify_rate = count / (time.perf_counter() - start)
    conn.close()
    return append_rate, verify_rate


def _pg_database(base: str) -> tuple[str, str]:
    name = f"spe_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(base).set(database=name).render_as_string(hide_password=False), name


def _drop_pg(base: str, name: str) -> None:
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=2000, help="single-commit appends")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers")
    parser.add_argument("--entries", type=int, default=100_000, help="log size to verify")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"audit benchmark: {args.appends} single-commit appends ({args.writers} writers), "
              f"verification over {args.entries} entries")
        db = Database(f"sqlite:///{root / 'control.db'}")
        db.upgrade()
        for writers in (1, args.writers):
            rate = appends_per_second(db, args.appends, writers)
            print(f"  SQLite     appends/s, single commit, {writers} writer(s): {rate:10,.0f}")
        pg = os.environ.get("SPE_TEST_POSTGRES_URL")
        if pg:
            url, name = _pg_database(pg)
            try:
                pdb = Database(url)
                pdb.upgrade()
                for writers in (1, args.writers):
                    rate = appends_per_second(pdb, args.appends, writers)
                    print(f"  PostgreSQL appends/s, single commit, {writers} writer(s): "
                          f"{rate:10,.0f}")
                pdb.dispose()
            finally:
                _drop_pg(pg, name)
        else:
            print("  PostgreSQL: skipped (SPE_TEST_POSTGRES_URL not set)")

        with db.read() as s:
            have = verify_chain(s).entries
        bulk_fill(db, max(0, args.entries - have))
        with db.read() as s:
            start = time.perf_counter()
            report = verify_chain(s)
            chain_s = time.perf_counter() - start
            assert report.ok
            start = time.perf_counter()
            tree = tree_at(s, report.entries)
            tree_s = time.perf_counter() - start
            assert tree.size == report.entries
            keys, log = KeyStore(root), CheckpointLog(root)
            start = time.perf_counter()
            cp = create_checkpoint(s, keys, log, "bench")
            cp_s = time.perf_counter() - start
            start = time.perf_counter()
            bundle = permit_bundle(s, cp, "permit-3")
            bundle_s = time.perf_counter() - start
        n = report.entries
        bare_append, bare_verify = bare_chain(root / "bare.db", n)
        print(f"  SPE verify_chain (hash + link of every entry):   {n / chain_s:12,.0f} entries/s"
              f"  ({chain_s:.2f} s for {n:,})")
        print(f"  Merkle tree over all entries (leaves + levels): {n / tree_s:12,.0f} entries/s"
              f"  ({tree_s:.2f} s)")
        print(f"  signed checkpoint, cached tree + permits tree:   {cp_s:12.3f} s")
        print(f"  one permit's proofs ({len(bundle['entries']):,} entries):"
              f"{bundle_s:20.3f} s")
        print(f"  bare SQLite hash chain verify (same size):       {bare_verify:12,.0f} entries/s")
        print(f"  bare SQLite hash chain appends/s, single commit: {bare_append:12,.0f}")
        db.dispose()


if __name__ == "__main__":
    main()
