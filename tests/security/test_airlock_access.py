"""The airlock against an attacker: every route authorises by role and permit, refusals never
echo data and are audited, nothing leaves without release. Real Keycloak tokens, real
workspace tokens, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from permits.schemas import PermitCreate
from permits.service import PermitService
from spe.audit.models import AuditEntry
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from spe.dp import receipt
from tests.integration.test_permit_service import ALPHA, body, register_dataset

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]
SECRET_CELL = b"sex,n\nF,120\nM,130\nsecret-marker-7f3a,4\n"


@pytest.fixture
def permits(db: Database) -> PermitService:
    register_dataset(db)
    return PermitService(db)


def issue(permits: PermitService, **over: Any) -> str:
    return permits.issue(ALPHA, PermitCreate.model_validate(body(**over))).permit_id


def base(pid: str) -> str:
    return f"/v1/permits/{pid}/exports"


def draft(client: TestClient, h: dict[str, str], pid: str, data: bytes = SECRET_CELL,
          receipts: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    r = client.post(base(pid), json={"justification": "aggregate table for the paper",
                                     "receipts": receipts or []}, headers=h)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    r = client.post(f"{base(pid)}/{rid}/files?name=t.csv", content=data, headers=h)
    assert r.status_code == 201, r.text
    return rid, r.json()["id"]


def test_who_may_do_what(api_client: TestClient, user_headers: Headers,
                         client_headers: Headers, api_settings: Settings,
                         permits: PermitService, db: Database) -> None:
    pid = issue(permits)                      # alice and bob
    other = issue(permits, persons=["carol"], reference="0002/2026/FI")
    alice, carol = user_headers("alice"), user_headers("carol")
    rid, fid = draft(api_client, alice, pid)
    # A researcher not named in the permit sees nothing: 404, never 403.
    for method, path in (("get", base(pid)), ("get", f"{base(pid)}/{rid}"),
                         ("post", f"{base(pid)}/{rid}/submit"),
                         ("get", f"{base(pid)}/{rid}/files/{fid}/content")):
        assert getattr(api_client, method)(path, headers=carol).status_code == 404, path
    assert api_client.post(base(pid), json={"justification": "let me out please"},
                           headers=carol).status_code == 404
    # A request of one permit is not reachable under another permit's path.
    assert api_client.get(f"{base(other)}/{rid}", headers=carol).status_code == 404
    # A workspace token of alice bound to the other permit... does not exist (not named);
    # one bound to this permit cannot reach the other permit.
    with db.write() as s:
        ws = mint_workspace_token(s, api_settings, subject="alice-subject", username="alice",
                                  permit_id=pid, workspace_id="ws-a").token
    ws_h = {"Authorization": f"Bearer {ws}"}
    assert api_client.get(base(other), headers=ws_h).status_code == 404
    assert api_client.get(base(pid), headers=ws_h).status_code == 200
    # Access bodies and hospital admins read; they never create.
    ab = client_headers("hdab-alpha")
    assert api_client.get(base(pid), headers=ab).status_code == 200
    assert api_client.post(base(pid), json={"justification": "access body export"},
                           headers=ab).status_code == 403
    assert api_client.post(base(pid), json={"justification": "hospital admin export"},
                           headers=user_headers("hadmin")).status_code == 403
    # The other access body does not see the permit at all.
    assert api_client.get(base(pid), headers=client_headers("hdab-beta")).status_code == 404
    # No token: 401.
    assert api_client.get(base(pid)).status_code == 401
    # Every refusal is in the audit log under the route's action.
    with db.read() as s:
        refused = {(e.actor, e.action) for e in s.execute(select(AuditEntry).where(
            AuditEntry.outcome == "refused", AuditEntry.permit_id == pid)).scalars()}
    assert {("carol", "airlock.submit"), ("carol", "airlock.download"),
            ("carol", "airlock.create"), ("hdab-alpha", "airlock.create")} <= refused


def test_inputs_are_validated_and_refusals_do_not_echo(api_client: TestClient,
                                                       user_headers: Headers,
                                                       permits: PermitService,
                                                       db: Database) -> None:
    pid = issue(permits, export_policy={"reviewers": 1, "allowed_kinds": ["csv"]})
    alice = user_headers("alice")
    rid, _fid = draft(api_client, alice, pid)
    for name in ("..%2F..%2Fetc%2Fpasswd", ".hidden", "a" * 101, "x%00.csv", "t%20.csv"):
        r = api_client.post(f"{base(pid)}/{rid}/files?name={name}", content=b"a,n\nx,10\n",
                           headers=alice)
        assert r.status_code in (404, 422), (name, r.status_code)
    assert api_client.get(f"{base(pid)}/not-an-id", headers=alice).status_code == 422
    r = api_client.post(base(pid), json={"justification": "x", "extra": 1}, headers=alice)
    assert r.status_code == 422
    # A failing table: the check reasons name counts and columns, never the cell values.
    got = api_client.post(f"{base(pid)}/{rid}/submit", headers=alice).json()
    text = str(got["files"][0]["checks"])
    assert "secret-marker" not in text
    with db.read() as s:
        audit = " ".join(str(e.details) + str(e.reason) for e in s.execute(
            select(AuditEntry).where(AuditEntry.permit_id == pid)).scalars())
    assert "secret-marker" not in audit


def test_forged_or_foreign_receipts_release_nothing(api_client: TestClient,
                                                    user_headers: Headers,
                                                    api_settings: Settings,
                                                    permits: PermitService) -> None:
    pid = issue(permits, export_policy={"allowed_kinds": ["csv"]})
    other = issue(permits, reference="0003/2026/FI")
    alice = user_headers("alice")
    data = b"sex,n\nF,3\nM,2\n"
    secret = api_settings.secret_key.get_secret_value()
    args: dict[str, Any] = {"charge_id": "c", "dataset": "demo", "csv": data,
                            "parquet": b"", "epsilon": 0.1, "delta": 0.0,
                            "issued_at": "2026-12-05T10:00:00", "rows": 2,
                            "columns": ["sex", "n"]}
    foreign = receipt.sign(secret, permit_id=other, **args)
    forged = receipt.sign("not-the-server-secret-not-the-server", permit_id=pid, **args)
    edited = {**receipt.sign(secret, permit_id=pid, **args), "epsilon": 10.0}
    for bad in (foreign, forged, edited):
        rid, _ = draft(api_client, alice, pid, data, [bad])
        got = api_client.post(f"{base(pid)}/{rid}/submit", headers=alice).json()
        assert got["state"] == "in_review", bad
        outcomes = {c["name"]: c["outcome"] for c in got["files"][0]["checks"]}
        assert outcomes.get("dp_receipt") == "fail"


def test_nothing_downloads_unless_released(api_client: TestClient, user_headers: Headers,
                                           permits: PermitService) -> None:
    pid = issue(permits)
    alice = user_headers("alice")
    rid, fid = draft(api_client, alice, pid, b"sex,n\nF,120\nM,130\n")
    content = f"{base(pid)}/{rid}/files/{fid}/content"
    assert api_client.get(content, headers=alice).status_code == 409   # draft
    api_client.post(f"{base(pid)}/{rid}/submit", headers=alice)
    assert api_client.get(content, headers=alice).status_code == 409   # in review
    api_client.post(f"{base(pid)}/{rid}/withdraw", headers=alice)
    assert api_client.get(content, headers=alice).status_code == 409   # withdrawn
    r = api_client.get(content, headers=alice)
    assert b"F,120" not in r.content
