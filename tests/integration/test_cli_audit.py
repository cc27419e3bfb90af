"""`spe audit verify/export` through the real CLI entry point on a SQLite control DB."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spe.audit import AuditEvent, record
from spe.config import get_settings
from spe.db import Database


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Database:
    monkeypatch.setenv("SPE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("SPE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    db = Database(get_settings().resolved_database_url)
    db.upgrade()
    for i in range(3):
        with db.write() as s:
            record(s, AuditEvent(action="audit.test", actor="op", target=str(i)))
    yield db
    db.dispose()
    get_settings.cache_clear()


def test_verify_and_export(cli_env: Database) -> None:
    from spe.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "3 entries" in result.output
    result = runner.invoke(app, ["audit", "export", "--after", "1"])
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [entry["seq"] for entry in lines] == [2, 3]
    assert lines[1]["prev_hash"] == lines[0]["entry_hash"]
    assert {entry["action_name"] for entry in lines} == {"AUDIT_TEST"}


def test_actions_listed_by_enum_name(cli_env: Database) -> None:
    from spe.audit import MEANINGS, AuditAction
    from spe.cli.main import app

    result = CliRunner().invoke(app, ["audit", "actions"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines()}
    assert listed == {action.name for action in AuditAction}
    assert MEANINGS[AuditAction.PERMIT_REVOKE] in result.output


def test_verify_fails_on_tampering(cli_env: Database) -> None:
    from spe.cli.main import app

    path = cli_env.url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_log_no_delete")
    conn.execute("DELETE FROM audit_log WHERE seq = 2")
    conn.commit()
    conn.close()
    result = CliRunner().invoke(app, ["audit", "verify"])
    assert result.exit_code == 1
    assert "BROKEN at entry 2" in result.output
