"""`spe audit` through the real CLI: no false assurance without a database, checkpoints, keys,
and a checkpoint exposing what the chain alone cannot see."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spe.audit import AuditEvent, record
from spe.config import get_settings
from spe.db import Database


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SPE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("SPE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "var"
    get_settings.cache_clear()


@pytest.fixture
def filled(data_dir: Path) -> Iterator[Database]:
    db = Database(get_settings().resolved_database_url)
    db.upgrade()
    for i in range(6):
        with db.write() as s:
            record(s, AuditEvent(action="audit.test", actor="op", permit_id=f"p{i % 2}",
                                 target=str(i)))
    yield db
    db.dispose()


def _run(*args: str) -> tuple[int, str]:
    from spe.cli.main import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("command", [["audit", "verify"], ["audit", "export"],
                                     ["audit", "checkpoint"]])
def test_read_only_commands_create_nothing(data_dir: Path, command: list[str]) -> None:
    code, out = _run(*command)
    assert code == 2, out
    assert "no control database" in out and "intact" not in out
    assert not data_dir.exists() or not any(data_dir.rglob("*"))


def test_uninitialised_database_is_not_reported_intact(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    sqlite3.connect(data_dir / "control.db").close()
    code, out = _run("audit", "verify")
    assert code == 2 and "no audit log" in out


def test_checkpoint_verify_keys_rotate_export(filled: Database, data_dir: Path) -> None:
    code, out = _run("audit", "verify")
    assert code == 0 and "6 entries; no checkpoint held yet" in out
    code, out = _run("audit", "checkpoint")
    assert code == 0 and "checkpoint signed: 6 entries" in out, out
    code, out = _run("audit", "verify")
    assert code == 0 and "matches 1 signed checkpoint(s), the latest of 6 entries" in out
    code, out = _run("audit", "keys")
    assert code == 0 and "(current)" in out
    code, out = _run("audit", "rotate-key")
    assert code == 0
    code, out = _run("audit", "keys")
    assert out.count("(current)") == 1 and len(out.splitlines()) == 2
    code, out = _run("audit", "export", "--permit", "p1")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["seq"] for e in lines] == [2, 4, 6] and [e["permit_seq"] for e in lines] == [1, 2, 3]
    assert all(len(e["salt"]) == 32 for e in lines)


def test_checkpoint_exposes_truncation_the_chain_misses(filled: Database) -> None:
    assert _run("audit", "checkpoint")[0] == 0
    path = filled.url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_log_no_delete")
    last = conn.execute("SELECT entry_hash FROM audit_log WHERE seq = 4").fetchone()[0]
    conn.execute("DELETE FROM audit_log WHERE seq > 4")
    conn.execute("UPDATE audit_head SET seq = 4, last_hash = ?", (last,))
    conn.commit()
    conn.close()
    code, out = _run("audit", "verify")
    assert code == 1 and "CONTRADICTS a signed checkpoint, first bad entry 5" in out, out
    code, out = _run("audit", "checkpoint")
    assert code == 1 and "NOT SIGNED" in out


def test_alerts_scan_and_list(filled: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    from spe.audit import Outcome

    monkeypatch.setenv("SPE_AUDIT_ALERT_REFUSALS", "3")
    get_settings.cache_clear()
    for _ in range(3):
        with filled.write() as s:
            record(s, AuditEvent(action="dp.query", actor="mallory", permit_id="p0",
                                 outcome=Outcome.REFUSED, reason="refused"))
    code, out = _run("audit", "alerts", "--scan")
    assert code == 0 and "scan: 1 new alert(s)" in out, out
    assert "many_refusals  permit=p0  key=mallory  count=3" in out
    code, out = _run("audit", "rotate-key")
    code, out = _run("audit", "export")
    actions = [json.loads(line)["action"] for line in out.splitlines()]
    assert actions[-2:] == ["audit.alert", "audit.key_rotate"]
