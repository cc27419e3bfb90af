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
