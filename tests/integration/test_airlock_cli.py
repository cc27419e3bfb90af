"""`spe airlock list|show|decide` as hospital admins with real Keycloak tokens, against the
real app (in-process transport), SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from permits.schemas import PermitCreate
from permits.service import PermitService
from spe.airlock import cli as airlock_cli
from spe.cli.main import app
from spe.db import Database
from tests.integration.test_permit_service import ALPHA, body, register_dataset

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]


def test_admins_list_show_decide(api_client: TestClient, user_headers: Headers, db: Database,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    register_dataset(db)
    pid = PermitService(db).issue(ALPHA, PermitCreate.model_validate(body(
        export_policy={"reviewers": 1, "allowed_kinds": ["csv"]}))).permit_id
    alice = user_headers("alice")
    rid = api_client.post(f"/v1/permits/{pid}/exports", json={
        "justification": "table 1 of the paper"}, headers=alice).json()["id"]
    api_client.post(f"/v1/permits/{pid}/exports/{rid}/files?name=t.csv",
                    content=b"sex,n\nF,120\nM,130\n", headers=alice)
    api_client.post(f"/v1/permits/{pid}/exports/{rid}/submit", headers=alice)
    monkeypatch.setattr(airlock_cli, "TRANSPORT", api_client._transport)
    runner = CliRunner()
    url = ["--api-url", "http://testserver"]

    def token(user: str) -> dict[str, str]:
        return {"SPE_TOKEN": user_headers(user)["Authorization"].split(" ", 1)[1]}

    assert runner.invoke(app, ["airlock", "list", pid, *url], env={"SPE_TOKEN": ""}
                         ).exit_code == 2
    listed = runner.invoke(app, ["airlock", "list", pid, *url], env=token("hadmin"))
    assert listed.exit_code == 0 and rid in listed.output and "in_review" in listed.output
    shown = runner.invoke(app, ["airlock", "show", pid, rid, *url], env=token("hadmin"))
    assert shown.exit_code == 0 and json.loads(shown.output)["files"][0]["kind"] == "csv"
    # The requester cannot decide, even through the CLI.
    refused = runner.invoke(app, ["airlock", "decide", pid, rid, "--decision", "approve",
                                  *url], env=token("alice"))
    assert refused.exit_code == 1 and "403" in refused.output
    done = runner.invoke(app, ["airlock", "decide", pid, rid, "--decision", "approve",
                               "--comment", "fine", *url], env=token("hadmin"))
    assert done.exit_code == 0 and "released" in done.output
