"""`GET /v1/datasets[/{name}]` against the real Keycloak: metadata only, role-checked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from spe.auth.principal import operator_principal
from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest
from spe.db import Database

pytestmark = pytest.mark.keycloak

Headers = Callable[[str], dict[str, str]]


@pytest.fixture
def with_dataset(db: Database, api_settings: Settings, tmp_path: Path) -> str:
    src = tmp_path / "src"
    generator.generate(src, 80, seed=4, fmt="parquet")
    ingest(db, api_settings, "apidemo", src, operator_principal("tester"))
    return "apidemo"


def test_readers_see_metadata(api_client: TestClient, with_dataset: str,
                              user_headers: Headers, client_headers: Headers) -> None:
    for headers in (user_headers("hadmin"), user_headers("op"), client_headers("hdab-alpha")):
        listing = api_client.get("/v1/datasets", headers=headers)
        assert listing.status_code == 200, listing.text
        assert [d["name"] for d in listing.json()] == [with_dataset]
        detail = api_client.get(f"/v1/datasets/{with_dataset}", headers=headers)
        assert detail.status_code == 200, detail.text
    body = detail.json()
    tables = {t["name"]: t for t in body["table_details"]}
    assert tables["person"]["row_count"] == 80
    assert body["privacy_unit"] == "person_id"
    columns = {c["name"]: c for c in tables["measurement"]["columns"]}
    assert columns["value_as_number"]["upper"] == 1000.0
    assert "_spe_row_rank" not in columns


def test_unknown_dataset_is_404(api_client: TestClient, user_headers: Headers) -> None:
    res = api_client.get("/v1/datasets/nope", headers=user_headers("hadmin"))
    assert res.status_code == 404
    assert res.headers["content-type"].startswith("application/problem+json")


def test_researchers_and_anonymous_are_refused(api_client: TestClient, with_dataset: str,
                                               user_headers: Headers) -> None:
    assert api_client.get("/v1/datasets").status_code == 401
    res = api_client.get(f"/v1/datasets/{with_dataset}", headers=user_headers("alice"))
    assert res.status_code == 403
