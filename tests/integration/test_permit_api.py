"""The permit API over HTTP with real Keycloak tokens, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from permits.api import SERVICE_KEY, get_service, get_sweeper
from permits.groups import KeycloakPermitGroups
from permits.models import Permit
from permits.service import PermitService
from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.auth.principal import SYSTEM
from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest
from spe.db import Database
from spe.errors import Conflict
from tests.integration.test_permit_service import NOW, body, register_dataset

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-omop")
    generator.generate(out, 20, seed=7, fmt="csv")
    return out


@pytest.fixture
def client(api_client: TestClient, db: Database) -> TestClient:
    register_dataset(db)
    return api_client


def _group(keycloak_admin: Any, permit_id: str) -> set[str] | None:
    from keycloak.exceptions import KeycloakGetError

    try:
        group = keycloak_admin.get_group_by_path(f"/permit-{permit_id}")
    except KeycloakGetError:
        return None
    if not isinstance(group, dict) or not group.get("id"):
        return None
    return {m["username"] for m in keycloak_admin.get_group_members(group["id"])}


def _issue(client: TestClient, headers: dict[str, str], **over: Any) -> dict[str, Any]:
    r = client.post("/v1/permits", json=body(**over), headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _refusals(db: Database) -> list[tuple[str, str, str | None]]:
    with db.read() as s:
        return [(e.action, e.actor, e.permit_id) for e in s.execute(
            select(AuditEntry).where(AuditEntry.outcome == "refused")
            .order_by(AuditEntry.seq)).scalars()]


def test_lifecycle_over_http(api_client: TestClient, api_app: FastAPI, api_settings: Settings,
                             db: Database, tiny_source: Path, client_headers: Headers,
                             user_headers: Headers, keycloak_admin: Any) -> None:
    ingest(db, api_settings, "demo", tiny_source, SYSTEM)  # the real registry
    alpha = client_headers("hdab-alpha")
    r = api_client.post("/v1/permits", json=body(), headers=alpha)
    assert r.status_code == 201, r.text
    permit = r.json()
    pid = permit["id"]
    assert r.headers["ETag"] == permit["etag"] and r.headers["Location"] == f"/v1/permits/{pid}"
    assert permit["status"] == "active" and permit["access_body"] == "hdab-alpha"
    try:
        assert _group(keycloak_admin, pid) == {"alice", "bob"}
        r = api_client.get(f"/v1/permits/{pid}", headers=alpha)
        assert r.status_code == 200 and r.headers["ETag"] == permit["etag"]
        etag = r.headers["ETag"]

        r = api_client.patch(f"/v1/permits/{pid}", json={"title": "x"}, headers=alpha)
        assert r.status_code == 428
        r = api_client.patch(f"/v1/permits/{pid}", json={"persons": ["alice", "carol"]},
                             headers={**alpha, "If-Match": etag})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2 and r.headers["ETag"] != etag
        assert _group(keycloak_admin, pid) == {"alice", "carol"}
        r = api_client.patch(f"/v1/permits/{pid}", json={"title": "y"},
                             headers={**alpha, "If-Match": etag})
        assert r.status_code == 412
        assert r.headers["content-type"].startswith("application/problem+json")

        for action in ("suspend", "resume"):
            r = api_client.post(f"/v1/permits/{pid}/{action}", json={"reason": "review"},
                                headers=alpha)
            assert r.status_code == 200, r.text
        r = api_client.post(f"/v1/permits/{pid}/resume", json={"reason": "again"}, headers=alpha)
        assert r.status_code == 409 and "not suspended" in r.json()["detail"]
        new_until = (NOW + timedelta(days=900)).isoformat()
        r = api_client.post(f"/v1/permits/{pid}/extend",
                            json={"valid_until": new_until, "reason": "follow-up"}, headers=alpha)
        assert r.status_code == 200 and r.json()["extended"] is True
        r = api_client.post(f"/v1/permits/{pid}/extend",
                            json={"valid_until": new_until, "reason": "more"}, headers=alpha)
        assert r.status_code == 409 and "extended once" in r.json()["detail"]
        r = api_client.post(f"/v1/permits/{pid}/revoke", json={"reason": "misuse"}, headers=alpha)
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        assert _group(keycloak_admin, pid) is None
        r = api_client.post(f"/v1/permits/{pid}/resume", json={"reason": "undo"}, headers=alpha)
        assert r.status_code == 409 and "revocation is final" in r.json()["detail"]
        etag = api_client.get(f"/v1/permits/{pid}", headers=alpha).headers["ETag"]
        r = api_client.patch(f"/v1/permits/{pid}", json={"title": "z"},
                             headers={**alpha, "If-Match": etag})
        assert r.status_code == 409

        r = api_client.get(f"/v1/permits/{pid}/versions", headers=alpha)
        changes = [v["change"] for v in r.json()["items"]]
        assert changes == ["issued", "amended", "suspended", "resumed", "extended", "revoked"]

        r = api_client.get("/v1/permit-events?after=0", headers=user_headers("op"))
        assert r.status_code == 200
        assert [e["kind"] for e in r.json()["items"]] == changes
        assert api_client.get("/v1/permit-events", headers=user_headers("alice")).status_code \
            == 403
        with db.read() as s:
            assert verify_chain(s).ok
    finally:
        get_service(api_app.state.spe).remove_group(pid)


def test_access_bodies_see_only_their_own(client: TestClient, db: Database,
                                          client_headers: Headers, user_headers: Headers,
                                          api_app: FastAPI) -> None:
    alpha, beta = client_headers("hdab-alpha"), client_headers("hdab-beta")
    a = _issue(client, alpha)
    b = _issue(client, beta, persons=["carol"])
    try:
        pid = a["id"]
        assert client.get(f"/v1/permits/{pid}", headers=beta).status_code == 404
        assert client.get(f"/v1/permits/{pid}/versions", headers=beta).status_code == 404
        r = client.patch(f"/v1/permits/{pid}", json={"title": "mine"},
                         headers={**beta, "If-Match": a["etag"]})
        assert r.status_code == 404
        for action in ("suspend", "revoke"):
            r = client.post(f"/v1/permits/{pid}/{action}", json={"reason": "x"}, headers=beta)
            assert r.status_code == 404
        assert [p["id"] for p in client.get("/v1/permits", headers=beta).json()["items"]] == \
            [b["id"]]
        assert [p["id"] for p in client.get("/v1/permits", headers=alpha).json()["items"]] == \
            [pid]
        # readers
        admin = user_headers("hadmin")
        assert client.get(f"/v1/permits/{pid}", headers=admin).status_code == 200
        assert len(client.get("/v1/permits", headers=admin).json()["items"]) == 2
        alice = user_headers("alice")
        assert client.get(f"/v1/permits/{pid}", headers=alice).status_code == 200
        assert client.get(f"/v1/permits/{b['id']}", headers=alice).status_code == 404
        assert [p["id"] for p in client.get("/v1/permits", headers=alice).json()["items"]] == \
            [pid]
        assert client.get(f"/v1/permits/{pid}", headers=user_headers("op")).status_code == 403
        # only access bodies write
        for who in ("alice", "hadmin", "op"):
            h = user_headers(who)
            assert client.post("/v1/permits", json=body(reference="R9"), headers=h
                               ).status_code == 403
            assert client.post(f"/v1/permits/{pid}/suspend", json={"reason": "x"}, headers=h
                               ).status_code == 403
        assert client.get(f"/v1/permits/{pid}").status_code == 401
        assert client.get(f"/v1/permits/{pid}",
                          headers={"Authorization": "Bearer nonsense"}).status_code == 401
        # status unchanged, refusals audited
        assert client.get(f"/v1/permits/{pid}", headers=alpha).json()["version"] == 1
        refusals = _refusals(db)
        assert ("permit.amend", "hdab-beta", pid) in refusals
        assert ("permit.suspend", "hdab-beta", pid) in refusals
        assert ("permit.read", "op", pid) in refusals
        assert ("permit.issue", "alice", None) in refusals
        assert any(actor == "anonymous" for _, actor, _ in refusals)
    finally:
        for p in (a, b):
            get_service(api_app.state.spe).remove_group(p["id"])


def test_bad_input_is_refused_with_each_field(client: TestClient, db: Database,
                                              client_headers: Headers,
                                              api_settings: Settings) -> None:
    alpha = client_headers("hdab-alpha")
    bad = body(purposes=["marketing"], persons=["alice", "alice"], extra_field=1,
               privacy_budget={"epsilon": -1, "delta": 1.5, "max_epsilon_per_query": 1},
               export_policy={"min_cell_count": 0, "allowed_kinds": ["exe"], "reviewers": 0},
               compute_quota={"gpus": 99, "cpus": 1, "memory_mb": 1, "disk_mb": 1},
               access_mode="pseudonymised", title="x" * 1000)
    r = client.post("/v1/permits", json=bad, headers=alpha)
    assert r.status_code == 422
    problem = r.json()
    assert problem["type"].endswith("/invalid-input") and problem["status"] == 422
    locs = {".".join(e["loc"][1:]) for e in problem["errors"]}
    for field in ("purposes.0", "persons", "extra_field", "privacy_budget.epsilon",
                  "privacy_budget.delta", "export_policy.min_cell_count",
                  "export_policy.allowed_kinds.0", "export_policy.reviewers",
                  "compute_quota.gpus", "compute_quota.memory_mb", "title",
                  "pseudonymisation_justification"):
        assert field in locs, (field, locs)
    assert "marketing" not in r.text  # offending values are not echoed

    r = client.post("/v1/permits", json=body(valid_until=body()["valid_from"]), headers=alpha)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "valid_until"]
    r = client.post("/v1/permits", content=b'{"reference": "NaN", "privacy_budget": '
                    b'{"epsilon": NaN}}', headers={**alpha, "Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/permits", content=b"{not json",
                    headers={**alpha, "Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/permits", json=body(datasets=[
        {"dataset": "demo", "tables": {"person": ["person_id", "ssn"], "note": ["x"]}},
        {"dataset": "nope", "tables": {"t": ["c"]}}]), headers=alpha)
    assert r.status_code == 422
    text = " ".join(e["msg"] for e in r.json()["errors"])
    assert "'ssn'" in text and "'note'" in text and "'nope'" in text
    r = client.post("/v1/permits", json=body(persons=["alice", "zed-nobody", "yves-nobody"]),
                    headers=alpha)
    assert r.status_code == 422 and "yves-nobody" in r.json()["detail"]
    assert len(r.json()["errors"]) == 2
    huge = b'{"title": "' + b"x" * (api_settings.max_request_bytes + 10) + b'"}'
    r = client.post("/v1/permits", content=huge,
                    headers={**alpha, "Content-Type": "application/json"})
    assert r.status_code == 413
    def chunks() -> Any:  # no Content-Length: the size is checked while reading
        yield b'{"title": "'
        for _ in range(api_settings.max_request_bytes // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    r = client.post("/v1/permits", content=chunks(),
                    headers={**alpha, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    with db.read() as s:
        assert s.execute(select(Permit)).first() is None  # nothing reached the permits table
    assert client.get("/v1/permits?limit=0", headers=alpha).status_code == 422
    assert client.get("/v1/permits?cursor=@@", headers=alpha).status_code == 422
    assert client.get("/v1/permits?status=bogus", headers=alpha).status_code == 422
    assert ("permit.issue", "hdab-alpha", None) in _refusals(db)


def test_idempotent_issue(client: TestClient, client_headers: Headers, api_app: FastAPI) -> None:
    alpha = {**client_headers("hdab-alpha"), "Idempotency-Key": "issue-0001"}
    first = client.post("/v1/permits", json=body(), headers=alpha)
    again = client.post("/v1/permits", json=body(), headers=alpha)
    try:
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
        other = client.post("/v1/permits", json=body(title="Other"), headers=alpha)
        assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
        listed = client.get("/v1/permits", headers=client_headers("hdab-alpha")).json()
        assert len(listed["items"]) == 1
    finally:
        get_service(api_app.state.spe).remove_group(first.json()["id"])


def test_concurrent_amend_one_winner(client: TestClient, client_headers: Headers,
                                     api_app: FastAPI) -> None:
    alpha = client_headers("hdab-alpha")
    permit = _issue(client, alpha)
    pid = permit["id"]
    codes: list[int] = []
    barrier = threading.Barrier(2)

    def amend(i: int) -> None:
        barrier.wait()
        r = client.patch(f"/v1/permits/{pid}", json={"title": f"race {i}"},
                         headers={**alpha, "If-Match": permit["etag"]})
        codes.append(r.status_code)

    try:
        threads = [threading.Thread(target=amend, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [200, 412]
        assert client.get(f"/v1/permits/{pid}", headers=alpha).json()["version"] == 2
    finally:
        get_service(api_app.state.spe).remove_group(pid)


def test_expiry_by_the_sweeper(client: TestClient, client_headers: Headers, user_headers: Headers,
                               api_app: FastAPI, db: Database, keycloak_admin: Any) -> None:
    alpha = client_headers("hdab-alpha")
    pid = _issue(client, alpha)["id"]
    state = api_app.state.spe
    service = get_service(state)
    assert get_sweeper(state).running  # started by the app's lifespan
    try:
        later = NOW + timedelta(days=366)
        service.clock = lambda: later
        r = client.get(f"/v1/permits/{pid}", headers=alpha)
        assert r.json()["status"] == "expired"  # effective at once, before any sweep
        assert get_sweeper(state).run_once() == [pid]
        assert _group(keycloak_admin, pid) is None
        events = client.get("/v1/permit-events", headers=user_headers("hadmin")).json()["items"]
        assert [e["kind"] for e in events] == ["issued", "expired"]
        r = client.post(f"/v1/permits/{pid}/suspend", json={"reason": "x"}, headers=alpha)
        assert r.status_code == 409 and "expired" in r.json()["detail"]
        r = client.get("/v1/permits?status=expired", headers=alpha)
        assert [p["id"] for p in r.json()["items"]] == [pid]
        with db.read() as s:
            actors = [e.actor for e in s.execute(select(AuditEntry).where(
                AuditEntry.action == "permit.expire")).scalars()]
        assert actors == ["system"]
    finally:
        service.remove_group(pid)


def test_keycloak_outage_is_503_and_writes_nothing(client: TestClient, client_headers: Headers,
                                                   api_app: FastAPI, api_settings: Settings,
                                                   db: Database) -> None:
    dead = api_settings.model_copy(update={"keycloak_url": "http://127.0.0.1:9"})
    api_app.state.spe.put(SERVICE_KEY, PermitService(
        db, groups=KeycloakPermitGroups(dead)))
    r = client.post("/v1/permits", json=body(), headers=client_headers("hdab-alpha"))
    assert r.status_code == 503 and "Keycloak" in r.json()["detail"]
    with db.read() as s:
        assert s.execute(select(Permit)).first() is None
        failed = s.execute(select(AuditEntry).where(AuditEntry.outcome == "failure")
                           ).scalars().all()
    assert [e.action for e in failed] == ["permit.issue"]


class _RacingGroups(KeycloakPermitGroups):
    """The real Keycloak adapter; right after provisioning, a rival request of the same access
    body commits a permit with the same reference (a deterministic race)."""

    def __init__(self, settings: Settings, rival: Callable[[], None]) -> None:
        super().__init__(settings)
        self.rival = rival
        self.provisioned: list[str] = []

    def provision(self, permit_id: str, usernames: Any) -> None:
        super().provision(permit_id, usernames)
        self.provisioned.append(permit_id)
        if len(self.provisioned) == 1:
            self.rival()


def test_failed_issue_after_provisioning_removes_the_group(
        api_settings: Settings, db: Database, keycloak_admin: Any) -> None:
    from permits.schemas import PermitCreate
    from tests.integration.test_permit_service import ALPHA

    register_dataset(db)
    plain = PermitService(db, groups=KeycloakPermitGroups(api_settings))
    rival_ids: list[str] = []
    racing = _RacingGroups(api_settings, lambda: rival_ids.append(
        plain.issue(ALPHA, PermitCreate.model_validate(body())).permit_id))
    service = PermitService(db, groups=racing)
    try:
        with pytest.raises(Conflict, match="reference"):
            service.issue(ALPHA, PermitCreate.model_validate(body()))
        loser = racing.provisioned[0]
        assert _group(keycloak_admin, loser) is None  # compensated
        assert _group(keycloak_admin, rival_ids[0]) == {"alice", "bob"}
    finally:
        for pid in rival_ids:
            plain.remove_group(pid)
