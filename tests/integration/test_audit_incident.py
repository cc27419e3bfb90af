"""The incident switch on both databases: a frozen permit's workspace token is refused at its
next request (a real token against the API), other permits go on, a thaw needs a reason and
is recorded; the evidence bundle is signed and its proofs verify with the remote verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from spe.audit import AuditEvent, incident, record, verify_chain
from spe.audit import verify_remote as vr
from spe.audit.checkpoints import CheckpointLog, KeyStore
from spe.auth.permit_checks import CHECKER_KEY, get_permit_checker
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings, get_settings
from spe.db import Database
from tests.keycloak_fixtures import bearer


def _active(session: Session, permit_id: str) -> bool:
    return permit_id in {"P-1", "P-2"}


def test_freeze_and_thaw_state(db: Database) -> None:
    checker = get_permit_checker({CHECKER_KEY.name: _active})
    assert checker is not None

    def active(pid: str) -> bool:
        with db.read() as s:
            return checker(s, pid)

    who = {"actor": "op", "role": "operator"}
    assert active("P-1") and active("P-2") and not active("P-3")
    incident.freeze(db, permit_id="P-1", reason="suspected exfiltration", **who)
    assert not active("P-1") and active("P-2")
    incident.freeze(db, permit_id=None, reason="breach at the hospital", **who)
    assert not active("P-1") and not active("P-2")
    incident.thaw(db, permit_id=None, reason="contained", **who)
    assert not active("P-1") and active("P-2")  # P-1's own freeze holds
    with pytest.raises(ValueError):
        incident.thaw(db, permit_id="P-1", reason="  ", **who)
    incident.thaw(db, permit_id="P-1", reason="cleared by the access body", **who)
    assert active("P-1")
    with db.read() as s:
        assert incident.frozen_state(s) == {"all": False, "permits": []}
        assert verify_chain(s).ok


@pytest.mark.keycloak
def test_frozen_permit_token_refused(api_app: FastAPI, api_client: TestClient,
                                     api_settings: Settings, db: Database) -> None:
    api_app.state.spe.put(CHECKER_KEY, _active)
    tokens = {}
    for pid in ("P-1", "P-2"):
        with db.write() as s:
            tokens[pid] = mint_workspace_token(
                s, api_settings, subject="sub-alice", username="alice", permit_id=pid,
                workspace_id=f"ws-alice-{pid}", checker=_active).token
    assert api_client.get("/v1/me", headers=bearer(tokens["P-1"])).status_code == 200
    incident.freeze(db, actor="op", role="operator", permit_id="P-1", reason="incident")
    refused = api_client.get("/v1/me", headers=bearer(tokens["P-1"]))
    assert refused.status_code == 401 and "not active" in refused.json()["detail"]
    assert api_client.get("/v1/me", headers=bearer(tokens["P-2"])).status_code == 200
    incident.thaw(db, actor="op", role="operator", permit_id="P-1", reason="cleared")
    assert api_client.get("/v1/me", headers=bearer(tokens["P-1"])).status_code == 200


def test_cli_and_signed_evidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spe.cli.main import app

    data_dir = tmp_path / "var"
    monkeypatch.setenv("SPE_DATA_DIR", str(data_dir))
    monkeypatch.delenv("SPE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    runner = CliRunner()
    assert runner.invoke(app, ["incident", "status"]).exit_code == 2  # no database: none made
    assert not data_dir.exists()
    db = Database(get_settings().resolved_database_url)
    db.upgrade()
    try:
        for i in range(5):
            with db.write() as s:
                record(s, AuditEvent(action="dp.query", actor="alice",
                                     permit_id="P-1" if i % 2 else "P-2",
                                     details={"charge_id": f"c{i}", "receipt": {
                                         "charge_id": f"c{i}", "sha256_csv": "ab" * 32}}))
        with db.read() as s:
            from spe.audit.proofs import create_checkpoint

            create_checkpoint(s, KeyStore(data_dir), CheckpointLog(data_dir), "test")
        r = runner.invoke(app, ["incident", "freeze", "--permit", "P-1", "--reason", "probe"])
        assert r.exit_code == 0 and "frozen: P-1" in r.output
        assert runner.invoke(app, ["incident", "freeze", "--reason", "x"]).exit_code == 2
        assert "frozen: P-1" in runner.invoke(app, ["incident", "status"]).output
        out = tmp_path / "evidence.json"
        r = runner.invoke(app, ["incident", "evidence", "--permit", "P-1", "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert out.stat().st_mode & 0o777 == 0o600
        signed = json.loads(out.read_text())
        assert incident.verify_evidence_signature(signed)
        bundle = signed["bundle"]
        cp = bundle["checkpoint"]
        vr.verify_checkpoint(cp, bundle["keys"])
        report = vr.verify_permit_bundle(bundle["audit"], cp, "P-1")
        assert report.entries == 4  # 2 queries, the freeze, the evidence request
        for held in bundle["held_checkpoints"]:
            vr.verify_extends(held["checkpoint"], cp, held["proof"])
        assert bundle["incident_state"]["permits"] == ["P-1"]
        assert [r["receipt"]["charge_id"] for r in bundle["dp_release_receipts"]] == ["c1", "c3"]
        assert bundle["export_requests"] == [] and "2 DP release receipts" in r.output
        forged = json.loads(out.read_text())
        forged["bundle"]["audit"]["entries"].pop()
        assert not incident.verify_evidence_signature(forged)
        r = runner.invoke(app, ["incident", "thaw", "--permit", "P-1", "--reason", "cleared"])
        assert r.exit_code == 0
        assert "frozen: P-1" not in runner.invoke(app, ["incident", "status"]).output
    finally:
        db.dispose()
        get_settings.cache_clear()


@pytest.mark.keycloak
def test_entries_record_client_address_and_workspace(
        api_app: FastAPI, api_client: TestClient, api_settings: Settings, db: Database) -> None:
    """Entries written while serving a request carry its client address and, for a workspace
    token, the workspace; never the token."""
    from sqlalchemy import select

    from spe.audit.models import AuditEntry

    api_app.state.spe.put(CHECKER_KEY, _active)
    with db.write() as s:
        token = mint_workspace_token(s, api_settings, subject="sub-alice", username="alice",
                                     permit_id="P-2", workspace_id="ws-alice-P-2",
                                     checker=_active).token

    def last() -> AuditEntry:
        with db.read() as s:
            return s.execute(select(AuditEntry).order_by(AuditEntry.seq.desc())
                             .limit(1)).scalar_one()

    assert api_client.get("/v1/permits/" + "x" * 20, headers=bearer(token)).status_code in (
        403, 404)
    entry = last()
    assert entry.actor != "anonymous"
    assert entry.details["client_address"] == "testclient"  # what the server saw
    assert entry.details["workspace"] == "ws-alice-P-2"
    assert token not in json.dumps(entry.details)
    assert api_client.get("/v1/permits/" + "y" * 20).status_code == 401
    entry = last()
    assert entry.actor == "anonymous" and entry.details["client_address"] == "testclient"
    assert "workspace" not in entry.details
    with db.write() as s:  # outside a request nothing is added
        record(s, AuditEvent(action="dp.query", actor="system"))
    assert "client_address" not in last().details
    with db.read() as s:
        assert verify_chain(s).ok
