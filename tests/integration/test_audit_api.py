"""``/v1/audit`` over HTTP with real Keycloak tokens on SQLite and PostgreSQL: who reads what,
cursor pagination, checkpoints for access bodies, and `verify-remote` against a running SPE
(uvicorn on loopback) that verifies one permit and detects a withheld entry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from spe.audit import AuditEvent, record
from spe.audit import verify_remote as vr
from spe.db import Database
from tests.integration.test_permit_service import body, register_dataset

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]


@pytest.fixture
def permits(api_client: TestClient, db: Database, client_headers: Headers) -> dict[str, str]:
    register_dataset(db)
    out = {}
    for body_name, ref in (("hdab-alpha", "A/0001/2026/FI"), ("hdab-beta", "B/0001/2026/FI")):
        r = api_client.post("/v1/permits", json=body(reference=ref),
                            headers=client_headers(body_name))
        assert r.status_code == 201, r.text
        out[body_name] = r.json()["id"]
    for i in range(6):
        with db.write() as s:
            record(s, AuditEvent(action="dp.query", actor="alice" if i % 2 else "bob",
                                 role="researcher",
                                 permit_id=out["hdab-alpha" if i < 4 else "hdab-beta"],
                                 target=str(i), details={"epsilon": 0.1}))
    return out


def _all(client: TestClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = 0
    while True:
        r = client.get("/v1/audit", params={**params, "cursor": cursor, "limit": 3},
                       headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        items += page["items"]
        if page["next_cursor"] is None:
            return items
        cursor = page["next_cursor"]


def test_who_reads_what(api_client: TestClient, permits: dict[str, str],
                        client_headers: Headers, user_headers: Headers) -> None:
    alpha, beta = permits["hdab-alpha"], permits["hdab-beta"]
    admin = _all(api_client, user_headers("hadmin"))
    assert [e["seq"] for e in admin] == list(range(1, len(admin) + 1))  # pages join up
    assert {alpha, beta} <= {e["permit_id"] for e in admin}
    own = _all(api_client, client_headers("hdab-alpha"))
    assert own and {e["permit_id"] for e in own} == {alpha}
    assert _all(api_client, client_headers("hdab-alpha"), permit_id=beta) == []
    mine = _all(api_client, user_headers("alice"))
    assert mine and {e["actor"] for e in mine} == {"alice"}
    refused = _all(api_client, user_headers("hadmin"), outcome="success", action="dp.query",
                   actor="bob")
    assert len(refused) == 3
    r = api_client.get("/v1/audit", params={"since": "2026-01-01T00:00:00"},
                       headers=user_headers("hadmin"))
    assert r.status_code == 422
    assert api_client.get("/v1/audit").status_code == 401
    reads = _all(api_client, user_headers("hadmin"), action="audit.read")
    assert reads and all("items" not in e["details"] for e in reads)


def test_checkpoints_and_proofs_for_access_bodies(api_client: TestClient,
                                                  permits: dict[str, str],
                                                  client_headers: Headers,
                                                  user_headers: Headers) -> None:
    alpha = client_headers("hdab-alpha")
    assert api_client.get("/v1/audit/checkpoints/latest", headers=alpha).status_code == 404
    r = api_client.post("/v1/audit/checkpoints", headers=alpha)
    assert r.status_code == 200, r.text
    cp = r.json()
    keys = api_client.get("/v1/audit/keys", headers=alpha).json()["keys"]
    vr.verify_checkpoint(cp, keys)
    assert api_client.get("/v1/audit/checkpoints/latest", headers=alpha).json() == cp
    pid = permits["hdab-alpha"]
    r = api_client.get(f"/v1/audit/permits/{pid}/proofs", params={"size": cp["size"]},
                       headers=alpha)
    assert r.status_code == 200, r.text
    assert vr.verify_permit_bundle(r.json(), cp, pid).entries >= 4
    # another access body, a researcher, an unknown size
    assert api_client.get(f"/v1/audit/permits/{pid}/proofs", params={"size": cp["size"]},
                          headers=client_headers("hdab-beta")).status_code == 404
    assert api_client.get(f"/v1/audit/permits/{pid}/proofs", params={"size": cp["size"]},
                          headers=user_headers("alice")).status_code == 403
    assert api_client.get(f"/v1/audit/permits/{pid}/proofs", params={"size": 1},
                          headers=alpha).status_code == 404
    r2 = api_client.post("/v1/audit/checkpoints", headers=user_headers("hadmin")).json()
    assert r2["size"] > cp["size"]
    proof = api_client.get("/v1/audit/consistency", params={"first": cp["size"],
                                                            "second": r2["size"]},
                           headers=alpha).json()["proof"]
    vr.verify_extends(cp, r2, proof)
    listed = api_client.get("/v1/audit/checkpoints", params={"after_size": cp["size"]},
                            headers=alpha).json()["checkpoints"]
    assert [c["size"] for c in listed] == [r2["size"]]
    assert api_client.get("/v1/audit/consistency", params={"first": 5, "second": 10**9},
                          headers=alpha).status_code == 422


class Withholding(vr.Remote):
    """The SPE's answers with one of the permit's entries taken out (what a dishonest
    operator would serve)."""

    def get(self, path: str, **params: Any) -> Any:
        answer = super().get(path, **params)
        if path.endswith("/proofs") and answer["entries"]:
            del answer["entries"][1]
        return answer


def test_verify_remote_against_a_running_spe(server_url: str, api_client: TestClient,
                                             permits: dict[str, str], client_token: Any,
                                             user_headers: Headers, db: Database,
                                             tmp_path: Path) -> None:
    pid = permits["hdab-alpha"]
    token = client_token("hdab-alpha")
    api_client.post("/v1/audit/checkpoints", headers=user_headers("hadmin"))
    state = tmp_path / "held.json"
    report = vr.verify_permit(vr.Remote(server_url, token), pid, state_file=state)
    assert report.entries >= 4 and state.is_file()
    with db.write() as s:
        record(s, AuditEvent(action="dp.query", actor="alice", permit_id=pid))
    api_client.post("/v1/audit/checkpoints", headers=user_headers("hadmin"))
    again = vr.verify_permit(vr.Remote(server_url, token), pid, state_file=state)
    assert again.entries > report.entries and "extends the held checkpoint" in again.notes[0]
    with pytest.raises(vr.VerificationError, match="withheld"):
        vr.verify_permit(Withholding(server_url, token), pid)
    # the CLI entry point, with the token from the environment
    import os

    os.environ["SPE_TEST_AUDIT_TOKEN"] = token
    try:
        assert vr.main(["--url", server_url, "--permit", pid, "--token-env",
                        "SPE_TEST_AUDIT_TOKEN", "--state", str(state)]) == 0
        beta = client_token("hdab-beta")
        os.environ["SPE_TEST_AUDIT_TOKEN"] = beta
        assert vr.main(["--url", server_url, "--permit", pid, "--token-env",
                        "SPE_TEST_AUDIT_TOKEN"]) == 1  # not beta's permit: 404
    finally:
        os.environ.pop("SPE_TEST_AUDIT_TOKEN", None)
