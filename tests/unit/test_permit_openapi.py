"""The OpenAPI document is a valid contract and every permit operation carries examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from openapi_spec_validator import validate
from typer.testing import CliRunner

from permits.api import router as permits_router
from spe.cli.main import app as cli

#: (path, method) of every operation of the permits router (other packages add their own
#: operations under /v1/permits/{id}/..., e.g. DP queries; those are not checked here).
PERMIT_OPERATIONS = {(route.path, method.lower()) for route in permits_router.routes
                     if isinstance(route, APIRoute) for method in route.methods}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data_dir: Path = tmp_path_factory.mktemp("openapi")
    result = CliRunner().invoke(cli, ["openapi"], env={"SPE_DATA_DIR": str(data_dir)})
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items()
            for method, op in item.items() if (path, method) in PERMIT_OPERATIONS]


def test_document_validates(document: dict[str, Any]) -> None:
    validate(document)


def test_every_permit_operation_is_documented_with_examples(document: dict[str, Any]) -> None:
    ops = _operations(document)
    assert len(ops) == 10
    ids = set()
    for path, method, op in ops:
        where = f"{method.upper()} {path}"
        assert op.get("summary") and op.get("description") and op.get("operationId"), where
        ids.add(op["operationId"])
        if "requestBody" in op:
            content = op["requestBody"]["content"]["application/json"]
            assert content.get("examples") or content.get("example"), where
        responses = op["responses"]
        ok = [c for c in responses if c.startswith("2")]
        assert ok, where
        for code, response in responses.items():
            assert response.get("description"), (where, code)
            contents = response.get("content", {})
            assert contents, (where, code)
            assert any("example" in c or "examples" in c for c in contents.values()), (where,
                                                                                      code)
        for code in ("401", "403", "422"):
            assert code in responses, (where, code)
            assert "application/problem+json" in responses[code]["content"], (where, code)
        if "{permit_id}" in path:
            assert "404" in responses, where
        if method in ("patch",):
            assert {"412", "428", "409"} <= set(responses), where
    assert len(ids) == len(ops)


def test_schemas_forbid_unknown_fields(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in ("PermitCreate", "PermitUpdate", "ReasonRequest", "ExtendRequest",
                 "PrivacyBudgetIn", "ExportPolicyIn", "ComputeQuotaIn", "DatasetGrantIn",
                 "HealthDataUser"):
        assert schemas[name].get("additionalProperties") is False, name
    assert schemas["PermitCreate"]["properties"]["title"]["maxLength"] == 300
