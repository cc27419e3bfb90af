"""Benchmark of the console's heaviest pages: ``.venv/bin/python -m bench.console
[--requests N] [--entries N] [--rounds N]``.

Fills a fresh SQLite control database with N export requests (a third in review) and N audit
entries (bulk rows: the chain's hashes are not what is measured here), logs a hospital admin in
by a session row, then times the export review queue and the audit browser (first page, a
filtered page, a page deep in the log by cursor) through the app in-process and prints p50 and
p99 in milliseconds per page. Defaults: 10,000 requests and 1,000,000 entries; the aim is a
p99 under 300 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import insert

from spe.airlock.models import ExportRequest
from spe.api.app import create_app
from spe.audit.models import AuditEntry, AuditHead
from spe.config import Settings
from spe.db import Database
from spe.web.auth import _hash
from spe.web.models import WebSession

BATCH = 20_000


def fill(db: Database, requests: int, entries: int) -> None:
    now = datetime.now(UTC)
    states = ("in_review", "released", "rejected")
    with db.write() as s:
        for start in range(0, requests, BATCH):
            s.execute(insert(ExportRequest), [
                {"id": f"{i:032x}", "permit_id": f"permit-{i % 200}",
                 "requester": f"user{i % 50}", "justification": "bench", "state": states[i % 3],
                 "round": 1, "reviewers_required": 2, "receipts": [], "reason": None,
                 "created_at": now - timedelta(minutes=requests - i),
                 "updated_at": now} for i in range(start, min(requests, start + BATCH))])
    last = "0" * 64
    for start in range(0, entries, BATCH):
        rows = []
        for seq in range(start + 1, min(entries, start + BATCH) + 1):
            digest = hashlib.sha256(f"{seq}".encode()).hexdigest()
            rows.append({"seq": seq, "time": now - timedelta(seconds=entries - seq),
                         "actor": f"user{seq % 50}", "role": "researcher",
                         "permit_id": f"permit-{seq % 200}", "action": "dp.query",
                         "target": None, "outcome": "success" if seq % 7 else "refused",
                         "reason": None, "request_id": digest[:32], "details": {"i": seq},
                         "prev_hash": last, "entry_hash": digest, "salt": None,
                         "permit_seq": None})
            last = digest
        with db.write() as s:
            s.execute(insert(AuditEntry), rows)
    with db.write() as s:
        head = s.get(AuditHead, 1)
        if head is None:
            s.add(AuditHead(id=1, seq=entries, last_hash=last))
        else:
            head.seq, head.last_hash = entries, last


def admin_cookie(db: Database) -> str:
    token = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    with db.write() as s:
        s.add(WebSession(id=_hash(token), kind="user", csrf=secrets.token_urlsafe(32),
                         created_at=now, expires_at=now + timedelta(hours=1),
                         data={"principal": {"subject": "b", "username": "hadmin",
                                             "kind": "user", "roles": ["hospital-admin"],
                                             "access_body": None}, "id_token": ""}))
    return token


def timed(client: TestClient, path: str, rounds: int) -> tuple[float, float]:
    client.get(path)  # warm-up: templates compiled, caches filled
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "var", database_url=f"sqlite:///{tmp}/c.db",
                            audit_checkpoint_interval_seconds=0)
        db = Database(settings.resolved_database_url)
        db.upgrade()
        start = time.perf_counter()
        fill(db, args.requests, args.entries)
        print(f"filled {args.requests} export requests and {args.entries} audit entries "
              f"in {time.perf_counter() - start:.1f} s")
        with TestClient(create_app(settings, db)) as client:
            client.cookies.set("spe_console", admin_cookie(db))
            pages = {
                "review queue": "/console/exports",
                "review queue, one permit": "/console/exports?permit_id=permit-7",
                "audit browser, first page": "/console/audit",
                "audit browser, one permit": "/console/audit?permit_id=permit-7",
                "audit browser, deep cursor": f"/console/audit?cursor={args.entries // 2}",
            }
            for name, path in pages.items():
                p50, p99 = timed(client, path, args.rounds)
                print(f"{name:28} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
        db.dispose()


if __name__ == "__main__":
    main()
