"""SIGKILL at random points while acts and their audit entries are being committed, on SQLite
and PostgreSQL: after every kill the log verifies, every acknowledged act is in the log and no
act that did not happen is recorded.

The child process is a real writer on the control database: each act inserts its row and
records its audit entry (``spe.audit.record``) in one ``db.write()`` transaction, then
acknowledges on stdout. 20 kills per backend by default; ``SPE_AUDIT_CRASH_KILLS=1000`` for
the long run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text

from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.db import Database

KILLS = int(os.environ.get("SPE_AUDIT_CRASH_KILLS", "20"))
ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys
from sqlalchemy import text
from spe.audit import AuditEvent, record
from spe.db import Database

db = Database(sys.argv[1])
start = int(sys.argv[2])
for i in range(start, start + 100000):
    with db.write() as s:
        s.execute(text("INSERT INTO crash_acts (id) VALUES (:i)"), {"i": i})
        record(s, AuditEvent(action="audit.test", actor="crash", permit_id=f"p{i % 3}",
                             target=f"act-{i}", details={"act": i}))
    print(i, flush=True)
"""


def test_sigkill_during_audited_acts(db: Database) -> None:
    with db.write() as s:
        s.execute(text("CREATE TABLE crash_acts (id INTEGER PRIMARY KEY)"))
    rng = random.Random(1234)
    acked: set[int] = set()
    next_id = 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(KILLS):
        child = subprocess.Popen([sys.executable, "-c", CHILD, db.url, str(next_id)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout is not None
        first = child.stdout.readline()  # started and committed at least one act
        assert first.strip(), "the writer did not start"
        acked.add(int(first))
        time.sleep(rng.uniform(0, 0.3))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        acked.update(int(line) for line in out.split())
        with db.read() as s:
            report = verify_chain(s)
            assert report.ok, (report.first_bad_seq, report.problem)
            acts = {int(r) for r in s.execute(text("SELECT id FROM crash_acts")).scalars()}
            logged = {int(e.details["act"]) for e in s.query(AuditEntry).filter(
                AuditEntry.actor == "crash")}
        assert acked <= acts, "an acknowledged act is missing"
        assert logged == acts, "an act and its audit entry did not commit together"
        next_id = max(acts) + 1 if acts else next_id
    assert len(acked) >= KILLS


PERMIT_CHILD = """
import sys
from permits.schemas import PermitCreate
from permits.service import PermitService
from permits.states import Action
from spe.db import Database
from tests.integration.test_permit_service import ALPHA, body

db = Database(sys.argv[1])
svc = PermitService(db)
n = int(sys.argv[2])
for i in range(n, n + 100000):
    pid = svc.issue(ALPHA, PermitCreate.model_validate(body(reference=f"C/{i}/2026/FI"))).permit_id
    print("issue", pid, flush=True)
    for action in (Action.SUSPEND, Action.RESUME, Action.SUSPEND):
        svc.transition(ALPHA, pid, action, reason="crash test")
        print(action.value, pid, flush=True)
"""


def test_sigkill_during_permit_changes(db: Database) -> None:
    """The same with real acts: permits issued, suspended and resumed by the permit service
    (each change one permit version and one audit entry, in one transaction)."""
    from permits.models import PermitVersion
    from tests.integration.test_permit_service import register_dataset

    register_dataset(db)
    rng = random.Random(99)
    acked: dict[str, int] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kills = max(5, KILLS // 2)
    for k in range(kills):
        child = subprocess.Popen([sys.executable, "-c", PERMIT_CHILD, db.url, str(k * 1000)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout is not None
        first = child.stdout.readline().split()
        assert first and first[0] == "issue", "the permit writer did not start"
        lines = [first]
        time.sleep(rng.uniform(0, 0.5))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        lines += [line.split() for line in out.splitlines() if line.strip()]
        for _verb, pid in lines:
            acked[pid] = acked.get(pid, 0) + 1
        with db.read() as s:
            report = verify_chain(s)
            assert report.ok, (report.first_bad_seq, report.problem)
            versions: dict[str, int] = {}
            for pid in s.query(PermitVersion.permit_id):
                versions[pid[0]] = versions.get(pid[0], 0) + 1
            logged: dict[str, int] = {}
            for e in s.query(AuditEntry).filter(
                    AuditEntry.action.in_(("permit.issue", "permit.suspend", "permit.resume")),
                    AuditEntry.outcome == "success"):
                assert e.permit_id is not None
                logged[e.permit_id] = logged.get(e.permit_id, 0) + 1
        for pid, count in acked.items():
            assert versions.get(pid, 0) >= count, "an acknowledged permit change is missing"
        assert logged == versions, "a permit change and its audit entry did not commit together"
