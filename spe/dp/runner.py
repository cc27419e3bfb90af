"""The DP pipeline without accounting: SQL -> plan -> cost -> noisy release.

Contract: :func:`prepare` parses, plans and prices a query from metadata and permit terms only
(no data touched; raises QueryRefused). :func:`release` runs a prepared query on the dataset
file and returns the noisy :class:`~spe.dp.engine.Release`. Callers that release to a person
must reserve the cost in the budget ledger first (:mod:`spe.dp.service` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from permits.terms import PermitTerms
from spe.config import Settings
from spe.datasets.metadata import DatasetMetadata
from spe.dp import duck
from spe.dp.engine import Release, execute
from spe.dp.mechanisms import Cost, price
from spe.dp.parse import parse
from spe.dp.plan import QueryPlan, compile_plan


@dataclass(frozen=True)
class Prepared:
    sql: str
    plan: QueryPlan
    cost: Cost


def prepare(sql: str, meta: DatasetMetadata, terms: PermitTerms, *, epsilon: float,
            delta: float, max_rows_per_person: int | None = None,
            max_groups_per_person: int | None = None) -> Prepared:
    """Parse, plan and price ``sql`` (pure: metadata and terms only)."""
    tree = parse(sql)
    plan = compile_plan(tree, meta, terms, epsilon=epsilon, delta=delta,
                        rows_per_person=max_rows_per_person,
                        groups_per_person=max_groups_per_person)
    return Prepared(sql=sql, plan=plan, cost=price(plan))


def release(prepared: Prepared, path: Path, settings: Settings,
            deadline: duck.Deadline | None = None) -> Release:
    """Run the prepared plan on the dataset file at ``path`` (read-only, locked down), every
    step under ``deadline`` (default: the query timeout from now)."""
    with duck.cursor(path, settings) as con:
        return execute(prepared.plan, prepared.cost.units, con, settings, deadline)
