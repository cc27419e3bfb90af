"""The airlock over HTTP end to end with real parts, on SQLite and PostgreSQL.

Real Keycloak tokens (alice, bob, carol researchers; hadmin, hadmin2 hospital admins), a real
workspace token, permits issued and suspended by the real permit service (its event reaches
the airlock through the in-process event stream), DP receipts signed by spe.dp.receipt with the
API's own secret, files checked from their bytes.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from permits.schemas import PermitCreate
from permits.service import PermitService
from permits.states import Action
from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from spe.dp import receipt
from tests.integration.test_permit_service import ALPHA, body, register_dataset

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]
TABLE = b"sex,n\nF,120\nM,130\n"


@pytest.fixture
def permits(db: Database) -> PermitService:
    register_dataset(db)
    return PermitService(db)


def issue(permits: PermitService, **over: Any) -> str:
    return permits.issue(ALPHA, PermitCreate.model_validate(body(**over))).permit_id


def base(pid: str) -> str:
    return f"/v1/permits/{pid}/exports"


def open_request(client: TestClient, h: dict[str, str], pid: str,
                 receipts: list[dict[str, Any]] | None = None) -> str:
    r = client.post(base(pid), json={"justification": "Table 2 of the paper, aggregated.",
                                     "receipts": receipts or []}, headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "draft"
    return str(r.json()["id"])


def upload(client: TestClient, h: dict[str, str], pid: str, rid: str, name: str,
           data: bytes) -> dict[str, Any]:
    r = client.post(f"{base(pid)}/{rid}/files?name={name}", content=data, headers={
        **h, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def submit(client: TestClient, h: dict[str, str], pid: str, rid: str) -> dict[str, Any]:
    r = client.post(f"{base(pid)}/{rid}/submit", headers=h)
    assert r.status_code == 200, r.text
    return dict(r.json())


def vote(client: TestClient, h: dict[str, str], pid: str, rid: str, decision: str,
         **extra: Any) -> Any:
    return client.post(f"{base(pid)}/{rid}/votes", json={"decision": decision, **extra},
                       headers=h)


def test_review_flow_two_independent_reviewers(api_client: TestClient, user_headers: Headers,
                                               permits: PermitService, db: Database) -> None:
    pid = issue(permits)
    alice, bob = user_headers("alice"), user_headers("bob")
    admin1, admin2 = user_headers("hadmin"), user_headers("hadmin2")
    rid = open_request(api_client, alice, pid)
    f = upload(api_client, alice, pid, rid, "figure.png", TABLE)  # a CSV named .png
    assert f["size"] == len(TABLE) and len(f["sha256"]) == 64
    # Only the requester changes the request; nobody votes on a draft.
    assert api_client.post(f"{base(pid)}/{rid}/files?name=x.csv", content=b"a,b\n1,2\n",
                          headers=bob).status_code == 403
    assert vote(api_client, admin1, pid, rid, "approve").status_code == 409
    got = submit(api_client, alice, pid, rid)
    assert got["state"] == "in_review"
    assert got["files"][0]["kind"] == "csv" and got["files"][0]["outcome"] == "needs_review"
    # Immutable after submission.
    assert api_client.post(f"{base(pid)}/{rid}/files?name=y.csv", content=b"a,b\n1,2\n",
                          headers=alice).status_code == 409
    # Researchers never vote, not even on their own request; nobody downloads before release.
    assert vote(api_client, alice, pid, rid, "approve").status_code == 403
    content = f"{base(pid)}/{rid}/files/{f['id']}/content"
    assert api_client.get(content, headers=alice).status_code == 409
    r = vote(api_client, admin1, pid, rid, "approve", comment="fine", shared=True)
    assert r.status_code == 200 and r.json()["state"] == "in_review"
    assert r.json()["votes"][0]["reviewer"] == "hadmin"
    # One approval is not enough; the second reviewer cannot see the first vote before voting.
    before = api_client.get(f"{base(pid)}/{rid}", headers=admin2).json()
    assert before["votes"] == [] and before["votes_received"] == 1
    assert api_client.get(f"{base(pid)}/{rid}", headers=alice).json()["votes"] == []
    assert vote(api_client, admin1, pid, rid, "approve").status_code == 409  # twice: no
    r = vote(api_client, admin2, pid, rid, "approve")
    assert r.status_code == 200 and r.json()["state"] == "released"
    assert len(r.json()["votes"]) == 2
    # The researcher sees only the shared comment, without reviewer names.
    seen = api_client.get(f"{base(pid)}/{rid}", headers=alice).json()["votes"]
    assert seen == [{"decision": "approve", "comment": "fine",
                     "created_at": seen[0]["created_at"]}]
    # Download: the permit's persons only, with their own login.
    got_file = api_client.get(content, headers=alice)
    assert got_file.status_code == 200 and got_file.content == TABLE
    assert api_client.get(content, headers=bob).status_code == 200
    assert api_client.get(content, headers=user_headers("carol")).status_code == 404
    assert api_client.get(content, headers=admin1).status_code == 403
    # After the permit ends, nobody downloads.
    permits.transition(ALPHA, pid, Action.SUSPEND, reason="misuse under investigation")
    assert api_client.get(content, headers=alice).status_code == 409
    with db.read() as s:
        assert verify_chain(s).ok
        actions = [e.action for e in s.execute(select(AuditEntry).where(
            AuditEntry.permit_id == pid).order_by(AuditEntry.seq)).scalars()]
    for action in ("airlock.create", "airlock.upload", "airlock.submit", "airlock.check",
                   "airlock.transition", "airlock.vote", "airlock.release",
                   "airlock.download"):
        assert action in actions, action


def test_dp_result_released_on_its_receipt_and_changed_bytes_are_not(
        api_client: TestClient, api_settings: Settings, user_headers: Headers,
        permits: PermitService, db: Database) -> None:
    pid = issue(permits, export_policy={"allowed_kinds": ["csv", "parquet"], "reviewers": 2})
    alice = user_headers("alice")
    table = pd.DataFrame({"gender_concept_id": [8507, 8532], "n": [71.4, 80.2]})
    csv, parquet = receipt.output_bytes(table)
    signed = receipt.sign(api_settings.secret_key.get_secret_value(), permit_id=pid,
                          charge_id="c-1", dataset="demo", csv=csv, parquet=parquet,
                          epsilon=0.5, delta=0.0, issued_at="2026-12-05T10:00:00", rows=2,
                          columns=["gender_concept_id", "n"])
    with db.write() as s:
        token = mint_workspace_token(s, api_settings, subject="alice-subject", username="alice",
                                     permit_id=pid, workspace_id="ws-1").token
    ws = {"Authorization": f"Bearer {token}"}
    rid = open_request(api_client, ws, pid, [signed])
    upload(api_client, ws, pid, rid, "answer.csv", csv)
    upload(api_client, ws, pid, rid, "answer.parquet", parquet)
    got = submit(api_client, ws, pid, rid)
    assert got["state"] == "released"
    checks = {c["name"]: c for c in got["files"][0]["checks"]}
    assert checks["dp_receipt"]["outcome"] == "pass"
    assert checks["dp_receipt"]["details"]["epsilon"] == 0.5
    # A workspace token never downloads (downloads leave the SPE): the person's login does.
    content = f"{base(pid)}/{rid}/files/{got['files'][0]['id']}/content"
    assert api_client.get(content, headers=ws).status_code == 403
    assert api_client.get(content, headers=alice).content == csv
    # The same answer with one byte changed goes to review, never released automatically.
    rid2 = open_request(api_client, alice, pid, [signed])
    upload(api_client, alice, pid, rid2, "answer.csv", csv.replace(b"71.4", b"71.5"))
    assert submit(api_client, alice, pid, rid2)["state"] == "in_review"


def test_blocking_checks_return_the_request(api_client: TestClient, user_headers: Headers,
                                            permits: PermitService) -> None:
    pid = issue(permits)
    alice = user_headers("alice")
    rid = open_request(api_client, alice, pid)
    upload(api_client, alice, pid, rid, "model.pt", pickle.dumps({"w": [1.0, 2.0]}))
    got = submit(api_client, alice, pid, rid)
    assert got["state"] == "returned_for_changes"
    reason = got["files"][0]["checks"][0]["reason"]
    assert "pickle" in reason.lower() and "never exported" in reason
    # Back to draft: the bad file is removed, a good one added, submitted again.
    r = api_client.post(f"{base(pid)}/{rid}/revise", headers=alice)
    assert r.status_code == 200 and r.json()["state"] == "draft"
    fid = got["files"][0]["id"]
    assert api_client.delete(f"{base(pid)}/{rid}/files/{fid}", headers=alice).status_code == 204
    upload(api_client, alice, pid, rid, "t.csv", TABLE)
    assert submit(api_client, alice, pid, rid)["state"] == "in_review"
    r = api_client.post(f"{base(pid)}/{rid}/withdraw", headers=alice)
    assert r.status_code == 200 and r.json()["state"] == "withdrawn"
    assert api_client.post(f"{base(pid)}/{rid}/submit", headers=alice).status_code == 409


def test_overriding_a_failed_check_needs_a_reason_and_one_reject_rejects(
        api_client: TestClient, user_headers: Headers, permits: PermitService) -> None:
    pid = issue(permits, export_policy={"reviewers": 1, "min_cell_count": 10,
                                        "allowed_kinds": ["csv"]})
    alice, admin = user_headers("alice"), user_headers("hadmin")
    rid = open_request(api_client, alice, pid)
    upload(api_client, alice, pid, rid, "t.csv", b"group,n\na,120\nb,3\n")
    got = submit(api_client, alice, pid, rid)
    assert got["state"] == "in_review"
    assert {c["name"]: c["outcome"] for c in got["files"][0]["checks"]}["cell_counts"] == "fail"
    r = vote(api_client, admin, pid, rid, "approve")
    assert r.status_code == 409 and "override_reason" in r.json()["detail"]
    r = vote(api_client, admin, pid, rid, "reject", comment="suppress the small cell",
             shared=True)
    assert r.status_code == 200 and r.json()["state"] == "rejected"


def test_differencing_against_an_earlier_release(api_client: TestClient,
                                                 user_headers: Headers,
                                                 permits: PermitService) -> None:
    pid = issue(permits, export_policy={"reviewers": 1, "allowed_kinds": ["csv"]})
    alice, admin = user_headers("alice"), user_headers("hadmin")
    rid = open_request(api_client, alice, pid)
    upload(api_client, alice, pid, rid, "t.csv", TABLE)
    submit(api_client, alice, pid, rid)
    assert vote(api_client, admin, pid, rid, "approve").json()["state"] == "released"
    rid2 = open_request(api_client, alice, pid)
    upload(api_client, alice, pid, rid2, "t2.csv", b"sex,n\nF,121\nM,130\n")
    got = submit(api_client, alice, pid, rid2)
    checks = {c["name"]: c for c in got["files"][0]["checks"]}
    assert checks["differencing"]["outcome"] == "fail"
    assert rid in checks["differencing"]["reason"]
    # The same bytes again are recognised by their hash.
    rid3 = open_request(api_client, alice, pid)
    upload(api_client, alice, pid, rid3, "again.csv", TABLE)
    got = submit(api_client, alice, pid, rid3)
    assert {c["name"] for c in got["files"][0]["checks"]} >= {"already_released"}


def test_suspension_rejects_pending_exports(api_client: TestClient, user_headers: Headers,
                                            permits: PermitService) -> None:
    pid = issue(permits)
    alice = user_headers("alice")
    draft = open_request(api_client, alice, pid)
    pending = open_request(api_client, alice, pid)
    upload(api_client, alice, pid, pending, "t.csv", TABLE)
    assert submit(api_client, alice, pid, pending)["state"] == "in_review"
    permits.transition(ALPHA, pid, Action.SUSPEND, reason="misuse under investigation")
    for rid in (draft, pending):
        got = api_client.get(f"{base(pid)}/{rid}", headers=alice).json()
        assert got["state"] == "rejected" and "suspended" in got["reason"]
    assert api_client.post(base(pid), json={"justification": "one more table please"},
                           headers=alice).status_code == 409


def test_parquet_named_csv_and_limits(api_client: TestClient, user_headers: Headers,
                                      permits: PermitService) -> None:
    pid = issue(permits, export_policy={"max_files": 1, "max_bytes": 5000})
    alice = user_headers("alice")
    rid = open_request(api_client, alice, pid)
    buf = io.BytesIO()
    pd.DataFrame({"group": ["a", "b"], "n": [40, 4]}).to_parquet(buf)
    upload(api_client, alice, pid, rid, "table.csv", buf.getvalue())
    r = api_client.post(f"{base(pid)}/{rid}/files?name=more.csv", content=TABLE, headers=alice)
    assert r.status_code == 409 and "(1)" in r.json()["detail"]
    got = submit(api_client, alice, pid, rid)
    assert got["files"][0]["kind"] == "parquet"
    rid2 = open_request(api_client, alice, pid)
    r = api_client.post(f"{base(pid)}/{rid2}/files?name=big.csv",
                        content=b"a,n\n" + b"x,10\n" * 2000, headers=alice)
    assert r.status_code == 413


def test_notebook_client_export_exports_withdraw(api_client: TestClient, api_settings: Settings,
                                                 permits: PermitService, db: Database,
                                                 tmp_path: Any) -> None:
    from spe.client import Client, SPEClientError, save_release

    pid = issue(permits, export_policy={"allowed_kinds": ["csv", "parquet", "txt"]})
    with db.write() as s:
        token = mint_workspace_token(s, api_settings, subject="alice-subject", username="alice",
                                     permit_id=pid, workspace_id="ws-c").token
    client = Client("http://testserver", token, pid,
                    transport=api_client._transport)  # the app in-process
    table = pd.DataFrame({"sex": ["F", "M"], "n": [120.4, 130.9]})
    csv, parquet = receipt.output_bytes(table)
    signed = receipt.sign(api_settings.secret_key.get_secret_value(), permit_id=pid,
                          charge_id="c-9", dataset="demo", csv=csv, parquet=parquet,
                          epsilon=0.2, delta=0.0, issued_at="2026-12-05T10:00:00", rows=2,
                          columns=["sex", "n"])
    table.attrs.update(csv=csv.decode(), receipt=signed)
    path = save_release(table, tmp_path / "answer.csv")
    got = client.export(path, "DP answer for figure 1", receipts=[signed])
    assert got["state"] == "released"
    other = tmp_path / "notes.txt"
    other.write_text("free text for the reviewers\n")
    pending = client.export([other], "methods note for the paper")
    assert pending["state"] == "in_review"
    assert [e["state"] for e in client.exports()] == ["released", "in_review"]
    assert client.withdraw(pending["id"])["state"] == "withdrawn"
    with pytest.raises(SPEClientError) as err:
        client.withdraw(got["id"])
    assert err.value.status == 409


def test_reviewers_decide_per_file(api_client: TestClient, user_headers: Headers,
                                   permits: PermitService) -> None:
    pid = issue(permits, export_policy={"reviewers": 2, "allowed_kinds": ["csv", "txt"]})
    alice = user_headers("alice")
    admin1, admin2 = user_headers("hadmin"), user_headers("hadmin2")
    rid = open_request(api_client, alice, pid)
    good = upload(api_client, alice, pid, rid, "t.csv", TABLE)
    note = upload(api_client, alice, pid, rid, "note.txt", b"methods, with a name in it\n")
    assert submit(api_client, alice, pid, rid)["state"] == "in_review"
    r = vote(api_client, admin1, pid, rid, "approve", files={"0" * 32: "approve"})
    assert r.status_code == 422
    r = vote(api_client, admin1, pid, rid, "approve", files={note["id"]: "reject"})
    assert r.status_code == 200 and r.json()["state"] == "in_review"
    r = vote(api_client, admin2, pid, rid, "approve")
    assert r.status_code == 200 and r.json()["state"] == "released"
    assert "1 files rejected" in r.json()["reason"]
    ok = api_client.get(f"{base(pid)}/{rid}/files/{good['id']}/content", headers=alice)
    assert ok.status_code == 200 and ok.content == TABLE
    held = api_client.get(f"{base(pid)}/{rid}/files/{note['id']}/content", headers=alice)
    assert held.status_code == 409
