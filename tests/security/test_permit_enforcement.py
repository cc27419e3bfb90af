"""A permit that stops being active stops being usable: its workspace tokens are refused on
the very next request (suspend, revoke, expiry), and a workspace token sees only its permit."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from permits.api import get_service, get_sweeper
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from spe.errors import SPEError
from tests.integration.test_permit_service import NOW, body, register_dataset
from tests.keycloak_fixtures import bearer

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]


def _mint(db: Database, settings: Settings, permit_id: str) -> str:
    with db.write() as session:
        return mint_workspace_token(session, settings, subject="sub-alice", username="alice",
                                    permit_id=permit_id, workspace_id=f"ws-{permit_id[:8]}").token


@pytest.fixture
def two_permits(api_client: TestClient, api_app: FastAPI, db: Database,
                client_headers: Headers) -> Any:
    register_dataset(db)
    alpha = client_headers("hdab-alpha")
    ids = []
    for ref in ("S-1", "S-2"):
        r = api_client.post("/v1/permits", json=body(reference=ref), headers=alpha)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    yield ids
    for pid in ids:
        get_service(api_app.state.spe).remove_group(pid)


@pytest.mark.parametrize("action", ["suspend", "revoke", "expire"])
def test_tokens_refused_once_the_permit_stops(action: str, api_client: TestClient,
                                              api_app: FastAPI, api_settings: Settings,
                                              db: Database, client_headers: Headers,
                                              two_permits: list[str]) -> None:
    pid, other = two_permits
    token = _mint(db, api_settings, pid)
    r = api_client.get(f"/v1/permits/{pid}", headers=bearer(token))
    assert r.status_code == 200, r.text
    # bound to its permit: the other permit (which also names alice) is invisible
    assert api_client.get(f"/v1/permits/{other}", headers=bearer(token)).status_code == 404
    assert [p["id"] for p in api_client.get("/v1/permits", headers=bearer(token)
                                            ).json()["items"]] == [pid]
    # a workspace token never changes permits
    assert api_client.post(f"/v1/permits/{pid}/suspend", json={"reason": "x"},
                           headers=bearer(token)).status_code == 403
    if action == "expire":
        service = get_service(api_app.state.spe)
        service.clock = lambda: NOW + timedelta(days=366)
        assert get_sweeper(api_app.state.spe).run_once() == two_permits
    else:
        r = api_client.post(f"/v1/permits/{pid}/{action}", json={"reason": "misuse"},
                            headers=client_headers("hdab-alpha"))
        assert r.status_code == 200
    r = api_client.get(f"/v1/permits/{pid}", headers=bearer(token))
    assert r.status_code == 401
    with db.write() as session, pytest.raises(SPEError, match=r"(?i)permit"):
        mint_workspace_token(session, api_settings, subject="s", username="alice",
                             permit_id=pid, workspace_id="ws-new")
