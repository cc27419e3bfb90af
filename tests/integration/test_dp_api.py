"""DP queries over HTTP end to end, with real components only, on SQLite and PostgreSQL.

A small synthetic OMOP dataset goes through the real ingest; the access body ``hdab-alpha``
issues permits over HTTP with its real Keycloak client-credentials token; alice queries with her
real Keycloak token and with a real workspace token; suspension and revocation go through the
permit API; the notebook client talks to a real uvicorn server on loopback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.auth.principal import SYSTEM
from spe.auth.workspace_tokens import mint_workspace_token
from spe.client import Client, SPEClientError, describe, save_release
from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest
from spe.db import Database
from spe.dp import receipt
from tests.integration.test_permit_service import body

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]
SQL = "SELECT gender_concept_id, COUNT(*) AS n FROM person GROUP BY 1"
DATASET = "dpdemo"
TABLES = {"person": ["person_id", "gender_concept_id", "year_of_birth"],
          "measurement": ["person_id", "measurement_concept_id", "measurement_date",
                          "value_as_number"]}


@pytest.fixture(scope="module")
def omop_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp-omop")
    generator.generate(out, 150, seed=11, fmt="csv")
    return out


@pytest.fixture
def dataset(db: Database, api_settings: Settings, omop_source: Path) -> str:
    ingest(db, api_settings, DATASET, omop_source, SYSTEM)
    return DATASET


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    """The shared API settings with a small answer-time bucket (padding stays on, cheaply)."""
    return api_settings.model_copy(update={"dp_answer_time_bucket_seconds": 0.02})


class Permits:
    """Issues permits over HTTP as hdab-alpha and revokes the survivors afterwards."""

    def __init__(self, post: Callable[..., httpx.Response], headers: dict[str, str]) -> None:
        self.post, self.headers = post, headers
        self.issued: list[str] = []

    def issue(self, reference: str, **budget: float) -> str:
        data = body(reference=reference, persons=["alice"],
                    datasets=[{"dataset": DATASET, "tables": TABLES}],
                    privacy_budget={"epsilon": 1.0, "delta": 1e-6,
                                    "max_epsilon_per_query": 0.5, **budget})
        r = self.post("/v1/permits", json=data, headers=self.headers)
        assert r.status_code == 201, r.text
        pid = str(r.json()["id"])
        self.issued.append(pid)
        return pid

    def change(self, pid: str, action: str) -> None:
        r = self.post(f"/v1/permits/{pid}/{action}", json={"reason": f"{action} in a test"},
                      headers=self.headers)
        assert r.status_code == 200, r.text

    def cleanup(self) -> None:  # removes the Keycloak groups the permits provisioned
        for pid in self.issued:
            self.post(f"/v1/permits/{pid}/revoke", json={"reason": "test done"},
                      headers=self.headers)


def _workspace_token(db: Database, settings: Settings, permit_id: str,
                     workspace_id: str = "ws-test") -> dict[str, str]:
    with db.write() as session:
        minted = mint_workspace_token(session, settings, subject="alice-subject",
                                      username="alice", permit_id=permit_id,
                                      workspace_id=workspace_id)
    return {"Authorization": f"Bearer {minted.token}"}


def _refusals(db: Database, action: str) -> list[tuple[str, str | None]]:
    with db.read() as s:
        return [(e.actor, e.permit_id) for e in s.execute(
            select(AuditEntry).where(AuditEntry.outcome == "refused",
                                     AuditEntry.action == action)
            .order_by(AuditEntry.seq)).scalars()]


def test_queries_over_http(api_client: TestClient, db: Database, api_settings: Settings,
                           dataset: str, client_headers: Headers,
                           user_headers: Headers) -> None:
    permits = Permits(api_client.post, client_headers("hdab-alpha"))
    try:
        pid = permits.issue("DP/0001/2026/FI")
        other = permits.issue("DP/0002/2026/FI")
        alice, bob = user_headers("alice"), user_headers("bob")
        ws = _workspace_token(db, api_settings, pid)
        ws_other = _workspace_token(db, api_settings, other, "ws-other")

        def post(headers: dict[str, str], payload: dict[str, Any], permit: str = pid,
                 **extra: str) -> httpx.Response:
            return api_client.post(f"/v1/permits/{permit}/queries", json=payload,
                                   headers={**headers, **extra})

        r = post(alice, {"sql": SQL, "epsilon": 0.2})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["columns"] == ["gender_concept_id", "n"]
        assert len(answer["rows"]) == 3  # declared public genders, empty groups included
        assert answer["accuracy"]["n"]["ci95_halfwidth"] > 0
        assert answer["cost"]["epsilon"] == pytest.approx(0.2)
        assert receipt.verify(answer["receipt"], api_settings.secret_key.get_secret_value(),
                              answer["csv"].encode())

        # Not named, or a token bound to another permit: the same 404 as an unknown permit,
        # so permit ids cannot be probed.
        not_named = post(bob, {"sql": SQL})
        unknown = post(alice, {"sql": SQL}, permit="P-NO-SUCH")
        assert not_named.status_code == unknown.status_code == 404
        assert not_named.json()["detail"] == f"No permit {pid} visible to the caller."
        assert unknown.json()["detail"] == "No permit P-NO-SUCH visible to the caller."
        r = post(ws_other, {"sql": SQL})  # alice's workspace token for another permit
        assert r.status_code == 404
        r = post(client_headers("hdab-alpha"), {"sql": SQL})  # access bodies do not query
        assert r.status_code == 403
        assert post(alice, {"sql": SQL}, permit="P-NO-SUCH").status_code == 404
        assert ("bob", pid) in _refusals(db, "dp.query")
        r = post(ws, {"sql": SQL, "epsilon": 0.1})
        assert r.status_code == 200, r.text

        refused = post(alice, {"sql": "SELECT * FROM read_csv('/etc/passwd')"})
        assert refused.status_code == 400
        assert refused.json()["type"].endswith("query-refused")
        too_much = post(alice, {"sql": SQL, "epsilon": 0.9})  # over the per-query cap
        assert too_much.status_code == 403
        assert too_much.json()["type"].endswith("budget-exceeded")
        dry = post(alice, {"sql": SQL, "epsilon": 0.3, "dry_run": True})
        assert dry.status_code == 200
        assert dry.json()["budget"]["epsilon_spent"] == pytest.approx(0.3)

        key = {"Idempotency-Key": "a1"}
        first = post(alice, {"sql": SQL, "epsilon": 0.1}, **key)
        second = post(alice, {"sql": SQL, "epsilon": 0.1}, **key)
        assert first.status_code == second.status_code == 200
        assert second.json()["replayed"] and second.json()["rows"] == first.json()["rows"]
        assert post(alice, {"sql": "SELECT COUNT(*) FROM person", "epsilon": 0.1},
                    **key).status_code == 409  # the key names another query
        budget = api_client.get(f"/v1/permits/{pid}/budget", headers=alice)
        assert budget.status_code == 200
        assert budget.json()["epsilon_spent"] == pytest.approx(0.4)
        assert budget.json()["queries"] == 3
        by_ws = api_client.get(f"/v1/permits/{pid}/budget", headers=ws)
        assert by_ws.json()["epsilon_spent"] == pytest.approx(0.4)
        by_body = api_client.get(f"/v1/permits/{pid}/budget",
                                 headers=client_headers("hdab-alpha"))
        assert by_body.status_code == 200
        assert api_client.get(f"/v1/permits/{pid}/budget",
                              headers=client_headers("hdab-beta")).status_code == 404
        assert api_client.get(f"/v1/permits/{pid}/budget", headers=bob).status_code == 404
        assert api_client.get(f"/v1/permits/{pid}/budget", headers=ws_other).status_code == 404

        # Exhaustion: 0.4 + 0.5 spent leaves 0.1; a 0.2 query is refused, nothing charged.
        assert post(alice, {"sql": SQL, "epsilon": 0.5}).status_code == 200
        r = post(alice, {"sql": SQL, "epsilon": 0.2})
        assert r.status_code == 403 and r.json()["type"].endswith("budget-exceeded")
        assert r.headers["content-type"].startswith("application/problem+json")
        spent = api_client.get(f"/v1/permits/{pid}/budget", headers=alice).json()
        assert spent["epsilon_spent"] == pytest.approx(0.9)
        assert spent["epsilon_spent"] <= spent["epsilon_total"]

        # Suspension halts queries at once, for both kinds of token; resuming restores them.
        permits.change(pid, "suspend")
        r = post(alice, {"sql": SQL, "epsilon": 0.05})
        assert r.status_code == 403 and "suspended" in r.json()["detail"]
        assert post(ws, {"sql": SQL, "epsilon": 0.05}).status_code == 401  # token revoked
        # The access body still reads the budget of a suspended permit.
        assert api_client.get(f"/v1/permits/{pid}/budget",
                              headers=client_headers("hdab-alpha")).status_code == 200
        permits.change(pid, "resume")
        assert post(alice, {"sql": SQL, "epsilon": 0.05}).status_code == 200
        permits.change(pid, "revoke")
        r = post(alice, {"sql": SQL, "epsilon": 0.05})
        assert r.status_code == 403 and "revoked" in r.json()["detail"]
        # Workspace tokens minted after suspension are refused too (minting checks status).
        assert post(ws, {"sql": SQL, "epsilon": 0.05}).status_code == 401
        final = api_client.get(f"/v1/permits/{pid}/budget",
                               headers=client_headers("hdab-alpha")).json()
        assert final["epsilon_spent"] == pytest.approx(0.95)
        assert final["queries"] == 5
    finally:
        permits.cleanup()


def test_workspace_token_of_a_removed_person(api_client: TestClient, db: Database,
                                             api_settings: Settings, dataset: str,
                                             client_headers: Headers) -> None:
    """An amendment that removes alice ends her access even through a live workspace token."""
    alpha = client_headers("hdab-alpha")
    permits = Permits(api_client.post, alpha)
    try:
        pid = permits.issue("DP/0003/2026/FI")
        ws = _workspace_token(db, api_settings, pid)
        url = f"/v1/permits/{pid}/queries"
        assert api_client.post(url, json={"sql": SQL, "epsilon": 0.1},
                               headers=ws).status_code == 200
        etag = api_client.get(f"/v1/permits/{pid}", headers=alpha).headers["ETag"]
        r = api_client.patch(f"/v1/permits/{pid}", json={"persons": ["carol"]},
                             headers={**alpha, "If-Match": etag})
        assert r.status_code == 200, r.text
        r = api_client.post(url, json={"sql": SQL, "epsilon": 0.1}, headers=ws)
        # Refused either when the token is validated (401) or at the permit check (403).
        assert r.status_code in (401, 403), r.text
        assert "rows" not in r.json()
    finally:
        permits.cleanup()


def test_notebook_client(server_url: str, db: Database, api_settings: Settings, dataset: str,
                         client_headers: Headers, tmp_path: Path) -> None:
    with httpx.Client(base_url=server_url, timeout=60) as http:
        permits = Permits(http.post, client_headers("hdab-alpha"))
        try:
            pid = permits.issue("DP/0004/2026/FI")
            token = _workspace_token(db, api_settings, pid)["Authorization"].split()[1]
            nb = Client(server_url, token, pid)
            assert token not in repr(nb)
            df = nb.sql(SQL, epsilon=0.2)
            assert list(df.columns) == ["gender_concept_id", "n"]
            assert len(df) == 3
            assert df.attrs["cost"]["epsilon"] == pytest.approx(0.2)
            assert "discrete laplace" in describe(df)
            out = save_release(df, tmp_path / "r.csv")
            assert receipt.verify(df.attrs["receipt"],
                                  api_settings.secret_key.get_secret_value(), out.read_bytes())
            parquet = save_release(df, tmp_path / "r.parquet", kind="parquet")
            assert receipt.verify(df.attrs["receipt"],
                                  api_settings.secret_key.get_secret_value(),
                                  parquet.read_bytes())
            same = nb.sql(SQL, epsilon=0.2, idempotency_key="nb-1")
            again = nb.sql(SQL, epsilon=0.2, idempotency_key="nb-1")
            assert again.attrs["charge_id"] == same.attrs["charge_id"]
            assert nb.cost(SQL, epsilon=0.3)["cost"]["epsilon"] == pytest.approx(0.3)
            b = nb.budget(plot=False)
            assert b.data["epsilon_spent"] == pytest.approx(0.4)
            assert "remaining" in repr(b)
            with pytest.raises(SPEClientError) as err:
                nb.sql(SQL, epsilon=0.5, idempotency_key="nb-2")  # 0.4 + 0.5 < 1: fine
                nb.sql(SQL, epsilon=0.5)  # exceeds the total
            assert err.value.status == 403
            assert err.value.problem["type"].endswith("budget-exceeded")
            permits.change(pid, "suspend")
            with pytest.raises(SPEClientError) as err:
                nb.sql(SQL, epsilon=0.01)
            assert err.value.status == 401
        finally:
            permits.cleanup()


def test_query_input_bounds(api_client: TestClient, user_headers: Headers) -> None:
    """Oversized permit ids and non-finite epsilons are refused at the edge (422)."""
    alice = user_headers("alice")
    long_id = api_client.post(f"/v1/permits/{'P' * 300}/queries", json={"sql": SQL},
                              headers=alice)
    assert long_id.status_code == 422
    for bad in ("Infinity", "NaN", "1e400"):
        r = api_client.post("/v1/permits/P-1/queries", headers={**alice,
                            "content-type": "application/json"},
                            content=f'{{"sql": "SELECT COUNT(*) FROM person", "epsilon": {bad}}}')
        assert r.status_code == 422, (bad, r.text)


def test_token_rate_limit_over_http(db: Database, api_settings: Settings, dataset: str,
                                    client_headers: Headers) -> None:
    """Queries, dry runs and budget reads of one workspace token share its rate limit; a
    refusal is 429 with Retry-After and audited with the SQL text, and the retries that follow
    are folded into a count instead of one entry each; another token of the same permit is not
    affected. The answer is padded to the bucket over HTTP too."""
    from spe.api.app import create_app
    from spe.dp.api import LIMITS_KEY
    from spe.dp.limits import Limits

    settings = api_settings.model_copy(update={"api_token_burst": 3,
                                               "api_token_requests_per_minute": 1.0,
                                               "dp_answer_time_bucket_seconds": 0.3})
    app = create_app(settings, db)
    app.state.spe.put(LIMITS_KEY, Limits(settings, fold_seconds=3600))  # fold every retry
    with TestClient(app) as client:
        permits = Permits(client.post, client_headers("hdab-alpha"))
        try:
            pid = permits.issue("DP/0005/2026/FI")
            ws = _workspace_token(db, settings, pid)
            url = f"/v1/permits/{pid}/queries"
            started = time.monotonic()
            assert client.post(url, json={"sql": SQL, "epsilon": 0.1},
                               headers=ws).status_code == 200
            assert time.monotonic() - started >= 0.3  # the answer time is padded
            assert client.post(url, json={"sql": SQL, "dry_run": True},
                               headers=ws).status_code == 200
            assert client.get(f"/v1/permits/{pid}/budget", headers=ws).status_code == 200
            for _ in range(3):
                r = client.post(url, json={"sql": SQL, "epsilon": 0.1}, headers=ws)
                assert r.status_code == 429, r.text
                assert r.json()["type"].endswith("too-many-requests")
            assert client.get(f"/v1/permits/{pid}/budget", headers=ws).status_code == 429
            other = _workspace_token(db, settings, pid, "ws-second")
            assert client.post(url, json={"sql": SQL, "dry_run": True},
                               headers=other).status_code == 200
            with db.read() as s:
                refused = list(s.execute(
                    select(AuditEntry).where(AuditEntry.outcome == "refused",
                                             AuditEntry.action.in_(["dp.query", "dp.budget"]))
                    .order_by(AuditEntry.seq)).scalars())
            # Four refusals, one entry: the first, with the SQL; the three retries are folded
            # (written as a count with the token's next entry).
            assert len(refused) == 1
            assert refused[0].action == "dp.query" and refused[0].details["sql"] == SQL
            assert refused[0].details["folded_refusals"] == 0
            budget = client.get(f"/v1/permits/{pid}/budget",
                                headers=client_headers("hdab-alpha")).json()
            assert budget["epsilon_spent"] == pytest.approx(0.1)  # refusals are free
        finally:
            permits.cleanup()


def test_deep_and_failing_queries_over_http(api_client: TestClient, db: Database,
                                            dataset: str, client_headers: Headers,
                                            user_headers: Headers,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A deep expression is a 400 refusal (never a 500); an exception after planning is the
    one generic 500 problem, audited and charged; neither echoes anything of the query."""
    from spe.dp import service

    permits = Permits(api_client.post, client_headers("hdab-alpha"))
    try:
        pid = permits.issue("DP/0006/2026/FI")
        url, alice = f"/v1/permits/{pid}/queries", user_headers("alice")
        deep = "SELECT COUNT(*) FROM person WHERE " + "(" * 3000 + "year_of_birth > 1" + \
            ")" * 3000
        r = api_client.post(url, json={"sql": deep, "epsilon": 0.1}, headers=alice)
        assert r.status_code == 400 and r.json()["type"].endswith("query-refused")

        def boom(*_a: Any, **_k: Any) -> Any:
            raise RecursionError("year_of_birth 1987")

        monkeypatch.setattr(service, "release", boom)
        r = api_client.post(url, json={"sql": SQL, "epsilon": 0.1}, headers=alice)
        assert r.status_code == 500 and r.json()["type"].endswith("query-failed")
        assert r.json()["detail"] == service.GENERIC_FAILURE and "1987" not in r.text
        budget = api_client.get(f"/v1/permits/{pid}/budget", headers=alice).json()
        assert budget["epsilon_spent"] == pytest.approx(0.1)
        with db.read() as s:
            outcomes = [e.outcome for e in s.execute(
                select(AuditEntry).where(AuditEntry.permit_id == pid,
                                         AuditEntry.action == "dp.query")
                .order_by(AuditEntry.seq)).scalars()]
        assert outcomes == ["refused", "failure"]
    finally:
        permits.cleanup()


def test_per_person_derived_table_over_http(api_client: TestClient, db: Database,
                                            dataset: str, client_headers: Headers,
                                            user_headers: Headers) -> None:
    """The age at first measurement through the API (a WITH per-person derived table): a noisy
    table with a receipt, the cost charged, and the audit log holding the SQL as sent; a
    derived table over a column the permit does not grant is refused without its name
    reaching DuckDB."""
    permits = Permits(api_client.post, client_headers("hdab-alpha"))
    try:
        pid = permits.issue("DP/0009/2026/FI")
        alice = user_headers("alice")
        sql = ("WITH f AS (SELECT person_id, MIN(measurement_date) AS first, COUNT(*) AS n "
               "FROM measurement GROUP BY person_id) SELECT year(f.first) AS y, COUNT(*) AS "
               "persons FROM f JOIN person p ON f.person_id = p.person_id GROUP BY 1")
        r = api_client.post(f"/v1/permits/{pid}/queries", json={"sql": sql, "epsilon": 0.3},
                            headers=alice)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["columns"] == ["y", "persons"] and answer["receipt"]
        assert answer["cost"]["epsilon"] == pytest.approx(0.3)
        refused = api_client.post(
            f"/v1/permits/{pid}/queries", headers=alice,
            json={"sql": "SELECT COUNT(*) FROM (SELECT person_id, MAX(value_source_value) AS v "
                         "FROM measurement GROUP BY person_id) f", "epsilon": 0.1})
        assert refused.status_code == 400 and refused.json()["type"].endswith("query-refused")
        with db.read() as s:
            texts = [e.details.get("sql") for e in s.execute(
                select(AuditEntry).where(AuditEntry.permit_id == pid,
                                         AuditEntry.action.like("dp.query%"))).scalars()]
        assert sql in texts  # the reserve entry holds the text as sent
        budget = api_client.get(f"/v1/permits/{pid}/budget", headers=alice).json()
        assert budget["epsilon_spent"] == pytest.approx(0.3)
    finally:
        permits.cleanup()
