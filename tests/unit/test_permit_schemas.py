"""Permit schemas: every field validated, sizes bounded, unknown fields refused."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from permits.purposes import ARTICLE, Purpose
from permits.schemas import PermitCreate, PermitPublic, PermitUpdate
from permits.service import decode_cursor, encode_cursor, etag_matches
from spe.errors import InvalidInput
from tests.integration.test_permit_service import body


def _locs(data: dict[str, Any]) -> set[str]:
    with pytest.raises(ValidationError) as err:
        PermitCreate.model_validate(data)
    return {".".join(map(str, e["loc"])) for e in err.value.errors()}


def test_example_is_valid() -> None:
    example = PermitCreate.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    PermitCreate.model_validate(example)
    PermitPublic.model_validate(
        PermitPublic.model_config["json_schema_extra"]["examples"][0])  # type: ignore[index]
    PermitCreate.model_validate(body())


def test_every_purpose_has_its_article() -> None:
    assert set(ARTICLE) == set(Purpose)
    assert all(text.startswith("Art 53(1)") for text in ARTICLE.values())


@pytest.mark.parametrize(("over", "loc"), [
    ({"purposes": []}, "purposes"),
    ({"purposes": ["scientific_research", "scientific_research"]}, "purposes"),
    ({"purposes": ["insurance_pricing"]}, "purposes.0"),
    ({"persons": []}, "persons"),
    ({"persons": ["Alice Smith"]}, "persons.0"),
    ({"persons": [f"u{i}" for i in range(201)]}, "persons"),
    ({"title": ""}, "title"),
    ({"title": "x" * 301}, "title"),
    ({"reference": "bad\nref"}, "reference"),
    ({"valid_from": "2026-01-01T00:00:00"}, "valid_from"),
    ({"valid_until": "2020-01-01T00:00:00Z"}, "valid_until"),
    ({"retention_days": 400}, "retention_days"),
    ({"datasets": []}, "datasets"),
    ({"datasets": [{"dataset": "demo", "tables": {}}]}, "datasets.0.tables"),
    ({"datasets": [{"dataset": "demo", "tables": {"person": ["a", "a"]}}]}, "datasets.0.tables"),
    ({"datasets": [{"dataset": "demo", "tables": {"drop table": ["a"]}}]},
     "datasets.0.tables.drop table.[key]"),
    ({"access_mode": "raw"}, "access_mode"),
    ({"access_mode": "pseudonymised"}, "pseudonymisation_justification"),
    ({"decision": "partially_granted"}, "not_granted"),
    ({"privacy_budget": {"epsilon": 0, "delta": 1e-6, "max_epsilon_per_query": 1}},
     "privacy_budget.epsilon"),
    ({"privacy_budget": {"epsilon": math.inf, "delta": 1e-6, "max_epsilon_per_query": 1}},
     "privacy_budget.epsilon"),
    ({"privacy_budget": {"epsilon": 1, "delta": 1, "max_epsilon_per_query": 1}},
     "privacy_budget.delta"),
    ({"privacy_budget": {"epsilon": 1, "delta": 0, "max_epsilon_per_query": 1}},
     "privacy_budget.delta"),
    ({"privacy_budget": {"epsilon": 1, "delta": 1e-6, "max_epsilon_per_query": 2}},
     "privacy_budget.max_epsilon_per_query"),
    ({"privacy_budget": {"epsilon": 1, "delta": 1e-6, "max_epsilon_per_query": 1,
                         "per_person_epsilon": 3}}, "privacy_budget.per_person_epsilon"),
    ({"export_policy": {"min_cell_count": 0}}, "export_policy.min_cell_count"),
    ({"export_policy": {"allowed_kinds": ["exe"]}}, "export_policy.allowed_kinds.0"),
    ({"export_policy": {"allowed_kinds": []}}, "export_policy.allowed_kinds"),
    ({"export_policy": {"reviewers": 0}}, "export_policy.reviewers"),
    ({"compute_quota": {"gpus": 9}}, "compute_quota.gpus"),
    ({"compute_quota": {"cpus": 0}}, "compute_quota.cpus"),
    ({"compute_quota": {"memory_mb": 10**9}}, "compute_quota.memory_mb"),
    ({"compute_quota": {"disk_mb": -1}}, "compute_quota.disk_mb"),
    ({"status": "active"}, "status"),
    ({"holder": {"organisation": "x"}}, "holder.principal_investigator"),
])
def test_field_refused(over: dict[str, Any], loc: str) -> None:
    assert loc in _locs(body(**over))


def test_update_is_partial_and_forbids_window_and_unknown() -> None:
    assert PermitUpdate.model_validate({"title": "t"}).changes() == {"title": "t"}
    for field in ("valid_until", "valid_from", "reference", "status", "id"):
        with pytest.raises(ValidationError):
            PermitUpdate.model_validate({field: "x"})


def test_cursor_and_etag_helpers() -> None:
    assert decode_cursor(encode_cursor(42)) == 42
    for bad in ("", "@@", encode_cursor(1)[:-2] + "zz", "eyJzIjotMX0"):
        with pytest.raises(InvalidInput):
            decode_cursor(bad)
    assert etag_matches('"a", "b"', '"b"') and not etag_matches('W/"b"', '"b"')
