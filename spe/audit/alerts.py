"""Alerts: rules that flag suspicious patterns in the audit log, recorded as audit events.

Contract
--------
* :func:`evaluate` is pure: given entries (plain dicts as exported) and a :class:`Policy`, it
  returns the alerts the *new* entries raise (older entries only fill the rule windows). Rules:

  ``many_refusals``       one actor refused ``refusals`` times within ``window_seconds``;
  ``budget_exhausted``    a query refused for the privacy budget (permit, per-query or
                          personal cap);
  ``repeated_queries``    one actor sent the same SQL (``sql_sha256``) ``repeats`` times within
                          the window (averaging attacks);
  ``rejected_export``     an airlock request refused or rejected;
  ``outside_permit_period`` an act refused because the permit was not (yet or any more) valid;
  ``browser_budget``      a workspace's browser byte budget was exceeded;
  ``network_missing``     a workspace network control failed (a missing table or rule).

  Each alert fires once, when its count reaches the threshold (immediate rules: per entry).
* :func:`scan` reads the entries recorded since the last scan (its cursor is kept in
  ``<data_dir>/audit/alerts.cursor``), records each alert as an ``audit.alert`` entry (actor
  ``system``, the rule as target, counts and the entries' sequence numbers in details, never
  data values) and sends them to the sinks: a webhook (JSON POST) and/or syslog. A sink that
  fails is logged and never stops the scan. Hospital admins list alerts with
  ``GET /v1/audit?action=audit.alert`` or ``spe audit alerts``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import urllib.request
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from spe.audit.actions import AuditAction
from spe.audit.events import AuditEvent
from spe.audit.models import AuditEntry
from spe.audit.writer import ROW_COLUMNS, record, row_fields
from spe.db import Database

logger = logging.getLogger("spe.audit.alerts")

_BUDGET_WORDS = ("budget", "epsilon cap", "per-query maximum", ") left")
_PERIOD_WORDS = ("expired", "not yet valid", "not active", "outside the permit")


@dataclass(frozen=True)
class Policy:
    refusals: int = 10
    repeats: int = 20
    window_seconds: float = 600.0


@dataclass(frozen=True)
class Alert:
    rule: str
    key: str
    message: str
    permit_id: str | None
    count: int
    first_seq: int
    last_seq: int


def _immediate(entry: dict[str, Any]) -> tuple[str, str] | None:
    action, outcome = str(entry["action"]), str(entry["outcome"])
    reason = str(entry.get("reason") or "").lower()
    if action == AuditAction.WORKSPACE_BROWSER_BUDGET_EXCEEDED.value:
        return "browser_budget", "a workspace exceeded its daily browser byte budget"
    if action.startswith("workspace.network") and outcome == "failure":
        return "network_missing", "a workspace network control failed"
    if action.startswith("airlock.") and (
            outcome == "refused" or str((entry.get("details") or {}).get("to", "")) in
            ("rejected", "changes_requested")):
        return "rejected_export", "an export request was refused or rejected"
    if outcome == "refused" and action.startswith("dp.") and any(w in reason
                                                                  for w in _BUDGET_WORDS):
        return "budget_exhausted", "a query was refused for the privacy budget"
    if outcome == "refused" and any(w in reason for w in _PERIOD_WORDS):
        return "outside_permit_period", "activity outside the permit's period was refused"
    return None


def evaluate(entries: Iterable[dict[str, Any]], new_after: int, policy: Policy) -> list[Alert]:
    """Alerts raised by entries with ``seq > new_after`` (earlier ones fill the windows)."""
    window = timedelta(seconds=policy.window_seconds)
    counters: dict[tuple[str, str], deque[tuple[datetime, int]]] = defaultdict(deque)
    alerts: list[Alert] = []
    for entry in entries:
        if str(entry["action"]).startswith("audit."):
            continue
        seq, is_new = int(entry["seq"]), int(entry["seq"]) > new_after
        when = datetime.fromisoformat(str(entry["time"]))
        permit = entry.get("permit_id")
        hit = _immediate(entry)
        if hit and is_new:
            alerts.append(Alert(hit[0], permit or str(entry["actor"]), hit[1], permit, 1,
                                seq, seq))
        counted: list[tuple[str, str, int, str]] = []
        if entry["outcome"] == "refused":
            counted.append(("many_refusals", str(entry["actor"]), policy.refusals,
                            "one actor was refused many times"))
        sql = (entry.get("details") or {}).get("sql_sha256")
        if entry["action"] == "dp.query" and sql:
            counted.append(("repeated_queries", f"{entry['actor']}:{sql}", policy.repeats,
                            "one actor repeated the same query many times"))
        for rule, key, threshold, message in counted:
            q = counters[(rule, key)]
            q.append((when, seq))
            while q and q[0][0] < when - window:
                q.popleft()
            if is_new and len(q) == threshold:
                alerts.append(Alert(rule, key.split(":")[0], message, permit, len(q), q[0][1],
                                    seq))
    return alerts


# Sinks ----------------------------------------------------------------------------------

def send_webhook(url: str, alerts: list[Alert], timeout: float = 5.0) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValueError("the alert webhook must be an http(s) URL")
    body = json.dumps({"alerts": [asdict(a) for a in alerts]}).encode()
    request = urllib.request.Request(url, data=body, method="POST",  # noqa: S310 - checked
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - scheme checked
        pass


def send_syslog(address: str, alerts: list[Alert]) -> None:
    """``address``: a socket path (``/dev/log``) or ``udp://host:port``."""
    if address.startswith("udp://"):
        host, _, port = address.removeprefix("udp://").rpartition(":")
        handler: logging.Handler = logging.handlers.SysLogHandler(address=(host, int(port)))
    else:
        handler = logging.handlers.SysLogHandler(address=address)
    try:
        for alert in alerts:
            handler.emit(logging.LogRecord(
                "spe.audit.alerts", logging.WARNING, __file__, 0,
                "spe audit alert %s", (json.dumps(asdict(alert), sort_keys=True),), None))
    finally:
        handler.close()


# The scan -------------------------------------------------------------------------------

def _cursor_path(data_dir: Path) -> Path:
    return data_dir / "audit" / "alerts.cursor"


def scan(db: Database, data_dir: Path, policy: Policy | None = None, *,
         webhook_url: str | None = None, syslog_address: str | None = None) -> list[Alert]:
    """Evaluate the entries recorded since the last scan; record and send their alerts."""
    policy = policy or Policy()
    path = _cursor_path(data_dir)
    after = int(path.read_text()) if path.is_file() else 0
    with db.read() as session:
        first_new = session.execute(select(AuditEntry.time).where(AuditEntry.seq > after)
                                    .order_by(AuditEntry.seq).limit(1)).scalar()
        if first_new is None:
            return []
        since = first_new - timedelta(seconds=policy.window_seconds)
        rows = session.execute(select(*ROW_COLUMNS).where(AuditEntry.time >= since)
                               .order_by(AuditEntry.seq)).all()
    entries = [{"seq": int(r[0]), **row_fields(r)} for r in rows]
    alerts = evaluate(entries, after, policy)
    last = max((e["seq"] for e in entries), default=after)
    with db.write() as session:
        for alert in alerts:
            record(session, AuditEvent(
                action=AuditAction.AUDIT_ALERT, actor="system", permit_id=alert.permit_id,
                target=alert.rule, reason=alert.message,
                details={"rule": alert.rule, "key": alert.key, "count": alert.count,
                         "first_seq": alert.first_seq, "last_seq": alert.last_seq}))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(last))
    os.replace(tmp, path)
    if alerts and webhook_url:
        try:
            send_webhook(webhook_url, alerts)
        except Exception:
            logger.exception("alert webhook failed")
    if alerts and syslog_address:
        try:
            send_syslog(syslog_address, alerts)
        except Exception:
            logger.exception("alert syslog failed")
    return alerts
