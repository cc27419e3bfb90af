"""GET /v1/permits/{id}/budget/charges (issue 15): the permit's recent DP queries with their
cost, newest first, for the workspace panel; readable as the budget is, 404 to anyone else.
Real API over uvicorn, real Keycloak tokens for the access body, real workspace tokens."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from spe.client import Client
from spe.config import Settings
from spe.db import Database
from tests.integration.test_dp_api import (  # noqa: F401 - fixtures used by name
    SQL,
    Permits,
    _workspace_token,
    api_settings,
    dataset,
    omop_source,
)

pytestmark = pytest.mark.keycloak


def test_recent_charges(server_url: str, db: Database,
                        api_settings: Settings, dataset: str,  # noqa: F811
                        client_headers: Any) -> None:
    with httpx.Client(base_url=server_url, timeout=60) as http:
        permits = Permits(http.post, client_headers("hdab-alpha"))
        try:
            pid = permits.issue("DP/0015/2026/FI")
            other = permits.issue("DP/0016/2026/FI")
            mine = _workspace_token(db, api_settings, pid)
            theirs = _workspace_token(db, api_settings, other, "ws-other")
            url = f"/v1/permits/{pid}/budget/charges"
            assert http.get(url, headers=mine).json()["items"] == []

            nb = Client(server_url, mine["Authorization"].split()[1], pid)
            nb.sql(SQL, epsilon=0.2)
            nb.sql(SQL, epsilon=0.1)
            r = http.get(url, headers=mine)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["permit_id"] == pid
            assert [c["epsilon"] for c in body["items"]] == pytest.approx([0.1, 0.2])
            assert all(c["state"] == "released" for c in body["items"])
            assert all(set(c) == {"id", "created_at", "state", "epsilon", "delta"}
                       for c in body["items"])  # no SQL text, no person
            assert nb.queries() == body["items"]  # the notebook client reads the same
            assert nb.permit()["reference"] == "DP/0015/2026/FI"
            # The access body reads it as it reads the budget; another permit's workspace
            # does not see it exists; no token: 401.
            assert http.get(url, headers=client_headers("hdab-alpha")).status_code == 200
            assert http.get(url, headers=theirs).status_code == 404
            assert http.get(url).status_code == 401
        finally:
            permits.cleanup()
