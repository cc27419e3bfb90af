"""Response models of the DP query API (``QueryAnswer``, ``BudgetStatus``): the OpenAPI
contract of what ``spe.dp.service.run_query`` and ``budget_status`` return.

The models document and check the shape; they allow extra keys so a field the service adds
later reaches the client (and is then added here).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Cost(BaseModel):
    model_config = ConfigDict(extra="allow")

    epsilon: float = Field(ge=0, description="epsilon charged (or that would be charged)")
    delta: float = Field(ge=0, description="delta charged (non-zero only when group keys are "
                         "thresholded)")


class BudgetCharge(BaseModel):
    """One DP query as the budget recorded it (no SQL text, no person)."""

    id: str
    created_at: datetime
    state: str = Field(description="released (answered), failed (refunded) or reserved "
                       "(running)")
    epsilon: float = Field(ge=0)
    delta: float = Field(ge=0)


class BudgetCharges(BaseModel):
    """A permit's newest DP queries, newest first, with what each cost."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "permit_id": "3f0c7f6e-3c5b-4c43-9d59-2b1f1cf0a3d2", "items": [{
            "id": "8c1e0f3a9b2d4c5e6f708192a3b4c5d6", "created_at": "2026-03-01T10:00:00Z",
            "state": "released", "epsilon": 0.2, "delta": 0.0}]}]})

    permit_id: str
    items: list[BudgetCharge]


class BudgetStatus(BaseModel):
    """A permit's privacy budget: total, spent and remaining (and the caller's own share when
    the permit has a per-person budget)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "permit_id": "3f0c7f6e-3c5b-4c43-9d59-2b1f1cf0a3d2", "epsilon_total": 10.0,
        "epsilon_spent": 1.0, "epsilon_remaining": 9.0, "delta_total": 1e-6,
        "delta_spent": 0.0, "delta_remaining": 1e-6, "max_epsilon_per_query": 1.0,
        "queries": 1}]})

    permit_id: str
    epsilon_total: float = Field(ge=0)
    epsilon_spent: float = Field(ge=0)
    epsilon_remaining: float = Field(ge=0)
    delta_total: float = Field(ge=0)
    delta_spent: float = Field(ge=0)
    delta_remaining: float = Field(ge=0)
    max_epsilon_per_query: float = Field(ge=0)
    queries: int = Field(ge=0, description="queries charged so far")
    per_person_epsilon: float | None = Field(None, description="each person's own epsilon "
                                             "limit, when the permit sets one")
    person_epsilon_spent: float | None = Field(None, description="what the caller spent of it")


class QueryAnswer(BaseModel):
    """The answer to a DP query. A dry run (``dry_run: true``) has only ``cost``, ``plan`` and
    ``budget``; an answer adds the noisy table (``columns``, ``rows``, also as ``csv`` and
    ``parquet_b64``), how each column and cell was produced (``accuracy``, ``cells``), the
    signed release ``receipt`` and ``replayed`` (true when an ``Idempotency-Key`` returned the
    stored answer without a new charge)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "dry_run": False, "replayed": False, "charge_id": "c-5d41402abc4b",
        "columns": ["gender", "n"], "rows": [["F", 5012.0], ["M", 4988.0]],
        "accuracy": {"n": {"mechanism": "laplace", "scale": 1.0, "ci95": 3.0}},
        "cells": [], "cost": {"epsilon": 1.0, "delta": 0.0},
        "plan": {"dataset": "omop_demo", "aggregates": ["count:n"]},
        "receipt": {"version": 1, "algorithm": "HMAC-SHA256"}, "csv": "gender,n\n",
        "parquet_b64": "", "budget": {"permit_id": "3f0c7f6e-3c5b-4c43-9d59-2b1f1cf0a3d2",
                                      "epsilon_total": 10.0, "epsilon_spent": 1.0,
                                      "epsilon_remaining": 9.0, "delta_total": 1e-6,
                                      "delta_spent": 0.0, "delta_remaining": 1e-6,
                                      "max_epsilon_per_query": 1.0, "queries": 1}}]})

    dry_run: bool = Field(False, description="true: priced only, nothing ran or was charged")
    cost: Cost
    plan: dict[str, Any] = Field(description="what the engine will run (no data values)")
    budget: BudgetStatus = Field(description="the budget after this query")
    replayed: bool | None = Field(None, description="answered from a stored result")
    charge_id: str | None = Field(None, description="the ledger charge of this answer")
    columns: list[str] | None = Field(None, description="output column names")
    rows: list[list[Any]] | None = Field(None, description="the noisy rows")
    accuracy: dict[str, dict[str, Any]] | None = Field(
        None, description="per column: mechanism, noise scale, 95 % CI half-width")
    cells: list[dict[str, dict[str, Any]]] | None = Field(
        None, description="per row and column: how that cell was produced")
    receipt: dict[str, Any] | None = Field(
        None, description="signed release receipt: the airlock releases files it covers")
    csv: str | None = Field(None, description="the table as CSV (the receipt's bytes)")
    parquet_b64: str | None = Field(None, description="the table as Parquet, base64")
