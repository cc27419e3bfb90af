"""SIGKILL at random points while acts and their audit entries are being committed, on SQLite
and PostgreSQL: after every kill the log verifies, every acknowledged act is in the log and no
act that did not happen is recorded.

Each writer is a real process on the control database: each act inserts its row and records its
audit entry (``spe.audit.record``) in one ``db.write()`` transaction, then acknowledges (a line
appended to its acknowledgement file after the commit). To keep a kill cheap, a persistent
parent process imports everything once and forks one fresh writer (its own engine and
connections) per kill; the test SIGKILLs that writer at a random moment while it commits.
200 kills per test by default (``SPE_AUDIT_CRASH_KILLS``; ``--audit-crash-long`` or
``SPE_AUDIT_CRASH_KILLS=1000`` for the long run).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.db import Database

ROOT = Path(__file__).resolve().parents[2]

#: The fork server: reads "<kind> <url> <start> <ack file>" lines, forks a writer for each and
#: answers its pid; "wait <pid>" reaps a killed writer and answers "done".
FORK_SERVER = """
import os, sys
from sqlalchemy import text
from spe.audit import AuditEvent, record
from spe.db import Database
from permits.schemas import PermitCreate
from permits.service import PermitService
from permits.states import Action
from tests.integration.test_permit_service import ALPHA, body


def acts(db, start, ack):
    for i in range(start, start + 100000):
        with db.write() as s:
            s.execute(text("INSERT INTO crash_acts (id) VALUES (:i)"), {"i": i})
            record(s, AuditEvent(action="audit.test", actor="crash", permit_id=f"p{i % 3}",
                                 target=f"act-{i}", details={"act": i}))
        os.write(ack, f"{i}\\n".encode())


def permits(db, start, ack):
    svc = PermitService(db)
    for i in range(start, start + 100000):
        pid = svc.issue(ALPHA, PermitCreate.model_validate(
            body(reference=f"C/{i}/2026/FI"))).permit_id
        os.write(ack, f"issue {pid}\\n".encode())
        for action in (Action.SUSPEND, Action.RESUME, Action.SUSPEND):
            svc.transition(ALPHA, pid, action, reason="crash test")
            os.write(ack, f"{action.value} {pid}\\n".encode())


for line in sys.stdin:
    words = line.split()
    if words[0] == "wait":
        os.waitpid(int(words[1]), 0)
        print("done", flush=True)
        continue
    kind, url, start, path = words
    child = os.fork()
    if child == 0:
        ack = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        (acts if kind == "acts" else permits)(Database(url), int(start), ack)
        os._exit(0)
    print(child, flush=True)
"""


def _kills(request: pytest.FixtureRequest) -> int:
    if request.config.getoption("--audit-crash-long", default=False):
        return 1000
    return int(os.environ.get("SPE_AUDIT_CRASH_KILLS", "200"))


@contextmanager
def _fork_server() -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        yield server
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)


def _ask(server: subprocess.Popen[str], line: str) -> str:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(line + "\n")
    server.stdin.flush()
    return server.stdout.readline().strip()


def _kill_writer(server: subprocess.Popen[str], kind: str, url: str, start: int, ack: Path,
                 rng: random.Random, max_wait: float) -> list[str]:
    """Fork a writer, let it commit at least one act, SIGKILL it at a random moment after;
    returns its acknowledgement lines."""
    pid = int(_ask(server, f"{kind} {url} {start} {ack}"))
    deadline = time.monotonic() + 60
    while not (ack.exists() and ack.read_text().strip()):  # committed at least one act
        assert time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.002)
    time.sleep(rng.uniform(0, max_wait))
    os.kill(pid, signal.SIGKILL)
    assert _ask(server, f"wait {pid}") == "done"
    lines = ack.read_text().splitlines()
    ack.unlink()
    return lines


def _barrier(db: Database) -> None:
    """Wait for a transaction the killed writer left behind: on PostgreSQL its server process
    may still be committing (a COMMIT sent just before the kill) or about to roll back. Its
    appends hold the audit head's row lock until then, so taking that lock waits for it."""
    with db.write() as s:
        s.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))


def test_sigkill_during_audited_acts(db: Database, request: pytest.FixtureRequest,
                                     tmp_path: Path) -> None:
    kills = _kills(request)
    with db.write() as s:
        s.execute(text("CREATE TABLE crash_acts (id INTEGER PRIMARY KEY)"))
    rng = random.Random(1234)
    acked: set[int] = set()
    next_id = 0
    with _fork_server() as server:
        for _ in range(kills):
            lines = _kill_writer(server, "acts", db.url, next_id, tmp_path / "ack", rng, 0.05)
            acked.update(int(line) for line in lines)
            _barrier(db)
            with db.read() as s:
                report = verify_chain(s)
                assert report.ok, (report.first_bad_seq, report.problem)
                acts = {int(r) for r in s.execute(text("SELECT id FROM crash_acts")).scalars()}
                logged = {int(str(t).removeprefix("act-")) for t in s.execute(text(
                    "SELECT target FROM audit_log WHERE actor = 'crash'")).scalars()}
            assert acked <= acts, "an acknowledged act is missing"
            assert logged == acts, "an act and its audit entry did not commit together"
            next_id = max(acts) + 1 if acts else next_id
    assert len(acked) >= kills


def test_sigkill_during_permit_changes(db: Database, request: pytest.FixtureRequest,
                                       tmp_path: Path) -> None:
    """The same with real acts: permits issued, suspended and resumed by the permit service
    (each change one permit version and one audit entry, in one transaction)."""
    from permits.models import PermitVersion
    from tests.integration.test_permit_service import register_dataset

    register_dataset(db)
    kills = _kills(request)
    rng = random.Random(99)
    acked: dict[str, int] = {}
    with _fork_server() as server:
        for k in range(kills):
            lines = _kill_writer(server, "permits", db.url, k * 1000, tmp_path / "ack", rng,
                                 0.1)
            assert lines and lines[0].startswith("issue"), "the permit writer did not start"
            for line in lines:
                _verb, pid = line.split()
                acked[pid] = acked.get(pid, 0) + 1
            _barrier(db)
            with db.read() as s:
                report = verify_chain(s)
                assert report.ok, (report.first_bad_seq, report.problem)
                versions: dict[str, int] = {}
                for (vpid,) in s.query(PermitVersion.permit_id):
                    versions[vpid] = versions.get(vpid, 0) + 1
                logged: dict[str, int] = {}
                for e in s.query(AuditEntry.permit_id).filter(
                        AuditEntry.action.in_(("permit.issue", "permit.suspend",
                                               "permit.resume")),
                        AuditEntry.outcome == "success"):
                    assert e[0] is not None
                    logged[e[0]] = logged.get(e[0], 0) + 1
            for pid, count in acked.items():
                assert versions.get(pid, 0) >= count, "an acknowledged permit change is missing"
            assert logged == versions, ("a permit change and its audit entry did not commit "
                                        "together")
