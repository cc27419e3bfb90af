"""Every refusal of the DP routes is audited exactly once: a wrong role or a schema error by
the audited route, a permit refusal by the DP API itself (not a second time by the route)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.db import Database
from tests.integration.test_dp_api import (  # noqa: F401
    SQL,
    Permits,
    api_settings,
    dataset,
    omop_source,
)

Headers = Callable[[str], dict[str, str]]


def _refused(db: Database) -> list[tuple[str, str, str | None]]:
    with db.read() as s:
        return [(e.action, e.actor, e.permit_id) for e in s.execute(
            select(AuditEntry).where(AuditEntry.outcome == "refused",
                                     AuditEntry.action.in_(("dp.query", "dp.budget")))
            .order_by(AuditEntry.seq)).scalars()]


def test_dp_refusals_audited_once(api_client: TestClient, db: Database,
                                  dataset: str, client_headers: Headers,  # noqa: F811
                                  user_headers: Headers) -> None:
    permits = Permits(api_client.post, client_headers("hdab-alpha"))
    try:
        pid = permits.issue("DP/0901/2026/FI")
        url = f"/v1/permits/{pid}/queries"
        # A hospital admin may not query (require_role): refused by the route, audited by it.
        r = api_client.post(url, json={"sql": SQL}, headers=user_headers("hadmin"))
        assert r.status_code == 403
        # bob is not named: 404 from the DP API's own check, audited there only.
        r = api_client.post(url, json={"sql": SQL}, headers=user_headers("bob"))
        assert r.status_code == 404
        # A schema error (epsilon out of range): audited by the route.
        r = api_client.post(url, json={"sql": SQL, "epsilon": -1},
                            headers=user_headers("alice"))
        assert r.status_code == 422
        refused = _refused(db)
        actors = [actor for _, actor, _ in refused]
        assert actors.count("hadmin") == 1 and actors.count("bob") == 1, refused
        assert actors.count("alice") == 1, refused
        assert all(action == "dp.query" and permit == pid for action, _, permit in refused)
    finally:
        permits.cleanup()
