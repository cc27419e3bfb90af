"""The OpenAPI document is the whole contract: every operation lists the problems it can give
as application/problem+json with the shared Problem schema, DP answers have models, and a
wrong method is 405 with Allow naming every method of the path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from spe.api.app import create_app
from spe.config import Settings
from spe.db import Database

PROBLEM = {"$ref": "#/components/schemas/Problem"}
PUBLIC = {("/healthz", "get"), ("/v1/version", "get")}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    path: Path = tmp_path_factory.mktemp("contract") / "control.db"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    settings = Settings(database_url=db.url, data_dir=path.parent / "var")
    return TestClient(create_app(settings, db))


@pytest.fixture(scope="module")
def document(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items()
            for method, op in item.items() if isinstance(op, dict) and "responses" in op]


def test_document_validates_and_has_the_problem_schema(document: dict[str, Any]) -> None:
    validate(document)
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["required"])


def test_every_operation_lists_its_problems(document: dict[str, Any]) -> None:
    for path, method, op in _operations(document):
        where = f"{method.upper()} {path}"
        assert op.get("operationId") and op.get("summary"), where
        responses = op["responses"]
        params = op.get("parameters", [])
        if (path, method) not in PUBLIC:
            assert {"401", "403"} <= set(responses), where
        if any(p["in"] == "path" for p in params):
            assert "404" in responses, where
        if params or "requestBody" in op:
            assert "422" in responses, where
        if "requestBody" in op:
            assert "413" in responses, where
        for code, response in responses.items():
            if int(code) >= 400:
                content = response["content"]
                assert list(content) == ["application/problem+json"], (where, code)
                assert content["application/problem+json"]["schema"] == PROBLEM, (where, code)
                assert response["description"], (where, code)


def test_dp_answers_have_models(document: dict[str, Any]) -> None:
    paths = document["paths"]
    query = paths["/v1/permits/{permit_id}/queries"]["post"]["responses"]
    budget = paths["/v1/permits/{permit_id}/budget"]["get"]["responses"]
    assert query["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/QueryAnswer"}
    assert budget["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BudgetStatus"}
    for responses in (query, budget):
        assert "429" in responses and "Retry-After" in responses["429"]["headers"]


def test_wrong_method_is_405_with_every_allowed_method(client: TestClient) -> None:
    r = client.delete("/v1/permits/abc")
    assert r.status_code == 405
    assert r.headers["content-type"] == "application/problem+json"
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "HEAD", "PATCH"}
    r = client.put("/v1/permits")
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "HEAD", "POST"}


def test_a_body_that_is_not_json_is_a_422_problem(client: TestClient) -> None:
    r = client.post("/v1/permits/abc/revoke", content=b"\xff\xfe",
                    headers={"Content-Type": "application/json",
                             "Authorization": "Bearer x"})
    assert r.status_code in (401, 422)
    assert r.headers["content-type"] == "application/problem+json"
