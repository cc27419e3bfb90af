"""Alert rules over real audit entries: recorded as audit.alert entries once per crossing, sent
to a webhook (a real HTTP server on loopback) and to syslog (a UDP socket on loopback)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from spe.audit import AuditEvent, Outcome, record, verify_chain
from spe.audit.alerts import Policy, evaluate, scan
from spe.audit.models import AuditEntry
from spe.db import Database

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _entry(seq: int, action: str = "dp.query", outcome: str = "success", actor: str = "alice",
           reason: str | None = None, minutes: float = 0, **details: Any) -> dict[str, Any]:
    return {"seq": seq, "time": (T0 + timedelta(minutes=minutes)).isoformat(),
            "action": action, "outcome": outcome, "actor": actor, "permit_id": "p1",
            "reason": reason, "details": details}


def test_rules() -> None:
    policy = Policy(refusals=3, repeats=4, window_seconds=600)
    refusals = [_entry(i, outcome="refused", minutes=i) for i in range(1, 6)]
    found = evaluate(refusals, 0, policy)
    assert [(a.rule, a.count, a.first_seq, a.last_seq) for a in found] == [
        ("many_refusals", 3, 1, 3)]  # once, when the threshold is reached
    spread = [_entry(i, outcome="refused", minutes=i * 6) for i in range(1, 6)]
    assert evaluate(spread, 0, policy) == []  # never 3 within 10 minutes
    assert evaluate(refusals, 5, policy) == []  # old entries raise nothing again
    repeats = [_entry(i, sql_sha256="abc", minutes=i / 10) for i in range(1, 6)]
    assert [a.rule for a in evaluate(repeats, 0, policy)] == ["repeated_queries"]
    immediate = [
        _entry(1, outcome="refused", reason="This query costs (epsilon 1); the permit has "
               "(epsilon 0.1, delta 0) left."),
        _entry(2, action="workspace.browser_budget_exceeded"),
        _entry(3, action="airlock.transition", to="rejected"),
        _entry(4, action="airlock.submit", outcome="refused", reason="too big"),
        _entry(5, action="permit.read", outcome="refused", reason="The permit has expired."),
        _entry(6, action="workspace.network_check", outcome="failure"),
        _entry(7, action="dp.query", outcome="success"),
    ]
    assert [a.rule for a in evaluate(immediate, 0, Policy(refusals=99))] == [
        "budget_exhausted", "browser_budget", "rejected_export", "rejected_export",
        "outside_permit_period", "network_missing"]


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        _Hook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


def test_scan_records_and_sends(db: Database, tmp_path: Path, webhook: str) -> None:
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(5)
    address = f"udp://127.0.0.1:{syslog.getsockname()[1]}"
    for _ in range(4):
        with db.write() as s:
            record(s, AuditEvent(action="dp.query", actor="mallory", role="researcher",
                                 permit_id="p1", outcome=Outcome.REFUSED, reason="refused"))
    policy = Policy(refusals=3)
    found = scan(db, tmp_path, policy, webhook_url=webhook, syslog_address=address)
    assert [a.rule for a in found] == ["many_refusals"]
    assert scan(db, tmp_path, policy, webhook_url=webhook) == []  # nothing new
    with db.read() as s:
        alerts = s.query(AuditEntry).filter(AuditEntry.action == "audit.alert").all()
        assert verify_chain(s).ok
    assert len(alerts) == 1 and alerts[0].details["rule"] == "many_refusals"
    assert alerts[0].details["count"] == 3 and alerts[0].actor == "system"
    assert _Hook.received[0]["alerts"][0]["key"] == "mallory"
    datagram = syslog.recv(4096).decode()
    assert "spe audit alert" in datagram and "many_refusals" in datagram
    syslog.close()
    # a dead webhook never stops the scan
    with db.write() as s:
        record(s, AuditEvent(action="workspace.browser_budget_exceeded", actor="hub",
                             permit_id="p1"))
    again = scan(db, tmp_path, policy, webhook_url="http://127.0.0.1:9/none")
    assert [a.rule for a in again] == ["browser_budget"]
