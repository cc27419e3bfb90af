"""``GET /v1/workspaces`` and ``GET /v1/gpus`` with real Keycloak tokens: operators and
hospital admins read them, researchers and access bodies get 403, nothing secret is shown."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from spe.db import Database
from workspaces import accounts, gpu, lifecycle
from workspaces.settings import WorkspaceSettings

Headers = Callable[[str], dict[str, str]]


def _setup(db: Database) -> tuple[str, str]:
    running = accounts.workspace_id("alice", "P-run")
    lifecycle.record_state(db, person="alice", permit_id="P-run", state="running")
    lifecycle.record_state(db, person="bob", permit_id="P-old", state="stopped")
    settings = WorkspaceSettings(gpu_indices=(0, 1))
    assert gpu.allocate(db, workspace_id=running, permit_id="P-run", person="alice", count=1,
                        settings=settings, actor="alice") == (0,)
    stopped = accounts.workspace_id("bob", "P-old")
    gpu.allocate(db, workspace_id=stopped, permit_id="P-old", person="bob", count=1,
                 settings=settings, actor="bob")
    gpu.release(db, stopped, actor="bob")
    return running, stopped


def test_operators_and_hospital_admins_list_workspaces_and_gpus(
        api_client: TestClient, db: Database, user_headers: Headers) -> None:
    running, stopped = _setup(db)
    for who in ("op", "hadmin"):
        r = api_client.get("/v1/workspaces", headers=user_headers(who))
        assert r.status_code == 200, r.text
        rows = {w["id"]: w for w in r.json()}
        assert set(rows) == {running, stopped}
        assert rows[running]["permit_id"] == "P-run" and rows[running]["person"] == "alice"
        assert rows[running]["state"] == "running" and rows[running]["started_at"]
        assert rows[running]["gpus"] == [0] and rows[stopped]["gpus"] == []
        assert rows[running]["server_name"] == lifecycle.server_name("P-run")
        text = r.text.lower()
        assert "token" not in text and "spew-" not in text and "/" not in "".join(
            str(v) for w in r.json() for k, v in w.items() if k not in (
                "started_at", "stopped_at", "updated_at", "delete_after"))
    only = api_client.get("/v1/workspaces", params={"state": "stopped"},
                          headers=user_headers("op"))
    assert [w["id"] for w in only.json()] == [stopped]
    by_permit = api_client.get("/v1/workspaces", params={"permit_id": "P-run"},
                               headers=user_headers("hadmin"))
    assert [w["id"] for w in by_permit.json()] == [running]

    g = api_client.get("/v1/gpus", headers=user_headers("op"))
    assert g.status_code == 200, g.text
    assert [(a["gpu_index"], a["workspace_id"], a["released_at"])
            for a in g.json()["allocations"]] == [(0, running, None)]
    assert g.json()["share_limit"] >= 1
    hist = api_client.get("/v1/gpus", params={"include_released": "true"},
                          headers=user_headers("hadmin"))
    assert {a["workspace_id"] for a in hist.json()["allocations"]} == {running, stopped}


def test_researchers_and_access_bodies_are_refused(
        api_client: TestClient, db: Database, user_headers: Headers,
        client_headers: Headers) -> None:
    _setup(db)
    for path in ("/v1/workspaces", "/v1/gpus"):
        assert api_client.get(path).status_code == 401
        for headers in (user_headers("alice"), client_headers("hdab-alpha")):
            r = api_client.get(path, headers=headers)
            assert r.status_code == 403, (path, r.status_code, r.text)
            assert "P-run" not in r.text
