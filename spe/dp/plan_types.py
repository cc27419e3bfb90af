"""The plan of a DP query: what :func:`spe.dp.plan.compile_plan` produces and the engine and
mechanisms consume. Frozen dataclasses, generated SQL fragments only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from spe.dp.kinds import AggKind
from spe.dp.sqltext import quote_ident

__all__ = ["AggKind", "Aggregate", "GroupKey", "PostStep", "QueryPlan", "TableRef"]


@dataclass(frozen=True)
class TableRef:
    alias: str  # generated alias t0, t1, ...
    table: str
    person_level: bool  # per-person or linked to a person (bounded per person)
    k: int  # rows per person kept (1 for reference tables: unused)
    one_per_person: bool = False  # unique on the privacy unit (checked at ingest): no rank
    unit: str | None = None  # the column holding the row's person (hidden for linked tables)
    #: a per-person derived table (``(SELECT person_id, MIN(..) ... GROUP BY person_id)``):
    #: its generated SQL; ``table`` is then the table it reads
    source_sql: str | None = None

    @property
    def from_sql(self) -> str:
        """``table AS alias`` (or ``(derived SQL) AS alias``) for FROM / JOIN."""
        src = f"({self.source_sql})" if self.source_sql is not None else quote_ident(self.table)
        return f"{src} AS {self.alias}"

    @property
    def unit_sql(self) -> str:
        assert self.unit is not None
        return f"{self.alias}.{quote_ident(self.unit)}"


@dataclass(frozen=True)
class GroupKey:
    name: str
    sql: str
    public_values: tuple[Any, ...] | None  # None: keys released only above a DP threshold


@dataclass(frozen=True)
class Aggregate:
    name: str
    kind: AggKind
    value_sql: str | None = None  # clamped DOUBLE expression (NULL for NULL/NaN rows)
    lower: float = 0.0
    upper: float = 0.0
    grid: float = 1.0  # released values of this aggregate lie on multiples of grid (2^k)
    alpha: float = 0.5
    population: bool = False  # VAR_POP/STDDEV_POP vs sample
    input_sql: str | None = None  # the DOUBLE expression before clamping (value_sql clamps it)


@dataclass(frozen=True)
class PostStep:
    """HAVING / ORDER BY / LIMIT, applied to the noisy output table only."""

    having_sql: str | None = None
    order_sql: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class QueryPlan:
    dataset: str
    tables: tuple[TableRef, ...]
    join_sql: str  # FROM ... JOIN ... (generated)
    truncation_sql: str  # rank filters (generated)
    where_sql: str | None
    keys: tuple[GroupKey, ...]
    aggregates: tuple[Aggregate, ...]
    columns: tuple[str, ...]  # output column order
    post: PostStep
    rows_per_person: int
    groups_per_person: int
    epsilon: float
    delta: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: Upper bound on the truncated (joined) rows any statistic reads, from metadata: K times
    #: the fewest rows of a person-level table (a person has at most K joined rows and appears
    #: in every person-level table). None when unknown.
    max_rows: int | None = None

    @property
    def public_keys(self) -> bool:
        return all(k.public_values is not None for k in self.keys)

    def summary(self) -> dict[str, Any]:
        """What the audit log records about the plan (no data values)."""
        return {
            "dataset": self.dataset,
            "tables": [t.table for t in self.tables],
            "keys": [k.name for k in self.keys],
            "public_keys": self.public_keys,
            "aggregates": [f"{a.kind}:{a.name}" for a in self.aggregates],
            "rows_per_person": self.rows_per_person,
            "groups_per_person": self.groups_per_person,
            "epsilon": self.epsilon,
            "delta": self.delta,
        }

    def fingerprint(self) -> str:
        body = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()
