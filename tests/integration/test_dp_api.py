"""HTTP API of DP queries and the notebook client, with permits and datasets stubbed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from permits.terms import PermitStatus
from spe.api.app import create_app
from spe.auth.principal import Principal, Role
from spe.client import Client, describe, save_release
from spe.config import Settings
from spe.db import Database
from spe.dp import receipt
from spe.dp.testing import make_dataset, make_terms

SQL = "SELECT gender_concept_id, COUNT(*) AS n FROM person GROUP BY 1"


def _principal(name: str) -> Principal:
    if name.startswith("ws:"):
        _, user, permit = name.split(":")
        return Principal(subject=user, username=user, kind="workspace",
                         roles=frozenset({Role.RESEARCHER}), permit_id=permit,
                         workspace_id="w1")
    return Principal(subject=name, username=name, kind="user",
                     roles=frozenset({Role.RESEARCHER}))


@pytest.fixture
def api(tmp_path: Path, sqlite_db: Database, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    path = tmp_path / "d.duckdb"
    meta = make_dataset(path, persons=300)
    state = {"terms": make_terms(meta, epsilon=1.0, max_epsilon_per_query=0.5)}
    import permits.service
    import spe.datasets.registry

    def get_terms(_session, permit_id):  # type: ignore[no-untyped-def]
        from spe.errors import NotFound

        if permit_id != state["terms"].permit_id:
            raise NotFound("no such permit")
        return state["terms"]

    monkeypatch.setattr(permits.service, "get_terms", get_terms)
    monkeypatch.setattr(spe.datasets.registry, "open_dataset", lambda *_a: (meta, path))
    settings = Settings(data_dir=tmp_path / "var", database_url=sqlite_db.url)
    app = create_app(settings, sqlite_db)

    @app.middleware("http")
    async def _fake_auth(request, call_next):  # type: ignore[no-untyped-def]
        who = request.headers.get("x-test-user")
        if who:
            request.state.spe_principal = _principal(who)
        return await call_next(request)

    return TestClient(app), state, settings


def _post(client: TestClient, who: str, body: dict, permit: str = "P-TEST-1",  # type: ignore[type-arg]
          **headers: str):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/permits/{permit}/queries", json=body,
                       headers={"x-test-user": who, **headers})


def test_query_authorisation_and_answer(api) -> None:  # type: ignore[no-untyped-def]
    client, state, settings = api
    r = _post(client, "alice", {"sql": SQL, "epsilon": 0.2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["columns"] == ["gender_concept_id", "n"]
    assert len(body["rows"]) == 3
    assert body["accuracy"]["n"]["ci95_halfwidth"] > 0
    assert body["cost"]["epsilon"] == pytest.approx(0.2)
    assert receipt.verify(body["receipt"], settings.secret_key.get_secret_value(),
                          body["csv"].encode())
    assert _post(client, "bob", {"sql": SQL}).status_code == 403
    assert _post(client, "ws:alice:OTHER", {"sql": SQL}).status_code == 403
    assert _post(client, "ws:alice:P-TEST-1", {"sql": SQL, "epsilon": 0.1}).status_code == 200
    assert _post(client, "alice", {"sql": SQL}, permit="NOPE").status_code == 404
    refused = _post(client, "alice", {"sql": "SELECT * FROM read_csv('/etc/passwd')"})
    assert refused.status_code == 400
    assert refused.json()["type"].endswith("query-refused")
    too_much = _post(client, "alice", {"sql": SQL, "epsilon": 0.9})
    assert too_much.status_code == 403 and too_much.json()["type"].endswith("budget-exceeded")
    dry = _post(client, "alice", {"sql": SQL, "epsilon": 0.3, "dry_run": True})
    assert dry.status_code == 200 and dry.json()["budget"]["epsilon_spent"] == pytest.approx(0.3)
    first = _post(client, "alice", {"sql": SQL, "epsilon": 0.1}, **{"Idempotency-Key": "a1"})
    second = _post(client, "alice", {"sql": SQL, "epsilon": 0.1}, **{"Idempotency-Key": "a1"})
    assert second.json()["replayed"] and second.json()["rows"] == first.json()["rows"]
    budget = client.get("/v1/permits/P-TEST-1/budget", headers={"x-test-user": "alice"})
    assert budget.json()["epsilon_spent"] == pytest.approx(0.4)
    state["terms"] = replace(state["terms"], status=PermitStatus.SUSPENDED)
    assert _post(client, "alice", {"sql": SQL, "epsilon": 0.1}).status_code == 403


def test_notebook_client(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _state, settings = api
    nb = Client("http://testserver", "token-not-used", "P-TEST-1")
    client.headers.update({"x-test-user": "alice"})
    nb._http = client
    df = nb.sql(SQL, epsilon=0.2)
    assert list(df.columns) == ["gender_concept_id", "n"]
    assert df.attrs["cost"]["epsilon"] == pytest.approx(0.2)
    assert "discrete laplace" in describe(df)
    out = save_release(df, tmp_path / "r.csv")
    assert receipt.verify(df.attrs["receipt"], settings.secret_key.get_secret_value(),
                          out.read_bytes())
    assert nb.cost(SQL, epsilon=0.3)["cost"]["epsilon"] == pytest.approx(0.3)
    b = nb.budget(plot=False)
    assert b.data["epsilon_spent"] == pytest.approx(0.2)
    assert "remaining" in repr(b)
