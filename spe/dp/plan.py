"""Compile an allow-listed SELECT into a :class:`QueryPlan` and generate its SQL.

Contract: :func:`compile_plan` takes the tree from :func:`spe.dp.parse.parse`, the dataset's
:class:`~spe.datasets.metadata.DatasetMetadata` and the permit's terms, and returns a frozen
plan or raises :class:`spe.errors.QueryRefused`. It reads metadata only, never data. Every
SQL fragment in the plan is *generated* here by :func:`_render` from allow-listed nodes:
identifiers are re-quoted, string literals re-escaped, numbers re-printed from parsed floats;
user text is never copied into the SQL that DuckDB runs.

Contribution bounds recorded in the plan (used by :mod:`spe.dp.mechanisms`):

* ``rows_per_person`` (K): every person-level table in FROM/JOIN is filtered to
  ``_spe_row_rank <= k_t`` (the rank is a uniformly random rank of the row among the person's
  rows, fixed at ingest). After inner joins on ``person_id`` a person has at most
  ``prod(k_t)`` joined rows (each joined row is one choice of a kept row per table); joins to a
  reference table on a key checked unique at ingest add no rows. Any WHERE filter only removes
  rows. So one person changes at most K rows of the table being aggregated, in at most K groups.
* ``groups_per_person`` (m): COUNT(DISTINCT person_id) is computed on the *untruncated* join
  (no undercount from row truncation), except over a join of two or more truncated tables
  (see :func:`spe.dp.engine.distinct_sql`: bounded work per person). A person adds at most 1
  to each group's distinct count; with GROUP BY each person keeps at most m of their groups
  (chosen by a salted hash, so a person in at most m groups is never dropped).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, Literal

from sqlglot import exp

from permits.terms import PermitTerms
from spe.datasets.defaults import normalise_public_values
from spe.datasets.metadata import (
    ROW_RANK_COLUMN,
    ColumnMeta,
    DatasetMetadata,
    LinkHop,
    TableMeta,
    refusal_text,
)
from spe.dp.parse import AGGREGATES, DIALECT, refuse
from spe.errors import QueryRefused

AggKind = Literal["count", "count_distinct", "sum", "avg", "variance", "stddev", "quantile"]
NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "INT", "BIGINT", "HUGEINT", "UTINYINT",
                 "USMALLINT", "UINTEGER", "UBIGINT", "FLOAT", "REAL", "DOUBLE", "DECIMAL",
                 "NUMERIC")
DATE_TYPES = ("DATE", "TIMESTAMP", "TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE", "DATETIME")
MAX_PUBLIC_CELLS = 100_000
#: Bound on the work a plan may ask of the engine: public cells x (quantile candidates for a
#: quantile, 1 otherwise) summed over aggregates. Checked from metadata, before data are read.
MAX_PLAN_WORK = 5_000_000
#: Released column names: identifiers the engine can print verbatim (no researcher prose).
OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
MAX_ROWS_PER_PERSON = 1_000
MAX_JOIN_TABLES = 4
DEFAULT_YEAR_RANGE = (1900, datetime.now(UTC).year)
_PARTS = {"year": "year", "month": "month", "quarter": "quarter", "day": "day",
          "dayofweek": "dayofweek", "dow": "dayofweek", "dayofyear": "dayofyear",
          "doy": "dayofyear"}
_PART_RANGES = {"month": (1, 12), "quarter": (1, 4), "day": (1, 31), "dayofweek": (0, 6),
                "dayofyear": (1, 366)}
_NODE_PART = {exp.Year: "year", exp.Month: "month", exp.Quarter: "quarter", exp.Day: "day",
              exp.DayOfWeek: "dayofweek", exp.DayOfYear: "dayofyear"}


@dataclass(frozen=True)
class TableRef:
    alias: str  # generated alias t0, t1, ...
    table: str
    person_level: bool  # per-person or linked to a person (bounded per person)
    k: int  # rows per person kept (1 for reference tables: unused)
    one_per_person: bool = False  # unique on the privacy unit (checked at ingest): no rank
    unit: str | None = None  # the column holding the row's person (hidden for linked tables)

    @property
    def unit_sql(self) -> str:
        assert self.unit is not None
        return f"{self.alias}.{_q(self.unit)}"


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


@dataclass
class _Ctx:
    meta: DatasetMetadata
    terms: PermitTerms
    dataset: str
    aliases: dict[str, TableRef] = field(default_factory=dict)  # user alias -> ref
    refs: list[TableRef] = field(default_factory=list)

    def table_meta(self, ref: TableRef) -> TableMeta:
        return self.meta.tables[ref.table]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _str_lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def compile_plan(select: exp.Select, meta: DatasetMetadata, terms: PermitTerms, *,
                 epsilon: float, delta: float, rows_per_person: int | None = None,
                 groups_per_person: int | None = None) -> QueryPlan:
    """Compile ``select`` into a plan against ``meta`` under ``terms`` (see module doc)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise QueryRefused("epsilon must be a positive number.")
    if not (math.isfinite(delta) and 0 <= delta < 1):
        raise QueryRefused("delta must be in [0, 1).")
    if rows_per_person is not None and not 1 <= rows_per_person <= MAX_ROWS_PER_PERSON:
        raise QueryRefused(f"max_rows_per_person must be in 1..{MAX_ROWS_PER_PERSON}.")
    if groups_per_person is not None and not 1 <= groups_per_person <= MAX_ROWS_PER_PERSON:
        raise QueryRefused(f"max_groups_per_person must be in 1..{MAX_ROWS_PER_PERSON}.")
    ctx = _Ctx(meta=meta, terms=terms, dataset=meta.name)
    join_sql, trunc = _compile_from(select, ctx, rows_per_person)
    where = select.args.get("where")
    if where is not None:
        _expect(where.this, ctx, "bool", "WHERE")
    for item in select.expressions:  # group keys and their SELECT copies, before matching
        inner = item.this if isinstance(item, exp.Alias) else item
        if not any(isinstance(n, AGGREGATES) for n in inner.walk()):
            _kind(inner, ctx)
    where_sql = _render(where.this, ctx, "bool") if where is not None else None
    keys, key_nodes = _compile_group(select, ctx)
    aggregates, columns = _compile_select(select, ctx, keys, key_nodes)
    if not aggregates:
        raise refuse("a SELECT without aggregates (row-level output)",
                     "aggregate with COUNT(*), SUM, AVG, ... and GROUP BY")
    k_total = 1
    for ref in ctx.refs:
        if ref.person_level:
            k_total *= ref.k
    if k_total > MAX_ROWS_PER_PERSON:
        raise refuse(f"a join whose per-person contribution bound ({k_total} rows) exceeds "
                     f"{MAX_ROWS_PER_PERSON}", "lower max_rows_per_person")
    m = groups_per_person or meta.max_groups_per_person
    for column in columns:
        if not OUTPUT_NAME.fullmatch(column):
            raise refuse("an output column name that is not a plain identifier of at most 63 "
                         "characters", "alias columns with letters, digits and '_'")
    work = _public_cells(keys) * sum(quantile_candidates(a) if a.kind == "quantile" else 1
                                     for a in aggregates)
    if work > MAX_PLAN_WORK:
        raise refuse(f"a query whose public cells x quantile candidates x aggregates "
                     f"({work:,}) exceed {MAX_PLAN_WORK:,}",
                     "group by fewer or coarser keys, or ask for fewer quantiles")
    post = _compile_post(select, ctx, aggregates, keys, key_nodes)
    return QueryPlan(
        dataset=meta.name, tables=tuple(ctx.refs), join_sql=join_sql, truncation_sql=trunc,
        where_sql=where_sql, keys=tuple(keys), aggregates=tuple(aggregates),
        columns=tuple(columns), post=post, rows_per_person=k_total, groups_per_person=m,
        epsilon=float(epsilon), delta=float(delta),
    )


# FROM / JOIN ------------------------------------------------------------------------------

def _resolve_table(node: exp.Table, ctx: _Ctx, rows_per_person: int | None) -> TableRef:
    dataset = node.args.get("db")
    if dataset is not None and dataset.name != ctx.dataset:
        raise refuse(f"the dataset {dataset.name!r} in this query",
                     f"query one dataset at a time (this query runs on {ctx.dataset!r})")
    name = node.name
    allowed = ctx.terms.allowed_columns(ctx.dataset, name)
    if name not in ctx.meta.tables or not allowed:
        raise refuse(f"the table {name!r}, which is unknown or not granted by the permit",
                     "use one of the permitted tables: " + ", ".join(sorted(
                         t for t in ctx.meta.tables if ctx.terms.allowed_columns(ctx.dataset, t)
                     )))
    tmeta = ctx.meta.tables[name]
    if tmeta.kind == "refused":
        raise QueryRefused(
            f"This query reads {tmeta.refusal or refusal_text(name)}. Until then it cannot be "
            "queried: ask the data holder to declare it, or query per-person tables.")
    person_level = tmeta.person_level
    if person_level and tmeta.privacy_unit is None:
        raise QueryRefused(f"The table {name!r} has no recorded privacy unit; it cannot be "
                           "queried until the dataset is ingested again.")
    k = rows_per_person or tmeta.max_rows_per_person if person_level else 1
    # A table whose unique key (checked at ingest) is the privacy unit holds at most one row
    # per person: rank <= k keeps every row for any k >= 1, so the filter is dropped and the
    # table counts 1 (not k) in the product K; the stability argument is unchanged.
    one = tmeta.kind == "person" and tmeta.unique_key == [ctx.meta.privacy_unit]
    ref = TableRef(alias=f"t{len(ctx.refs)}", table=name, person_level=person_level,
                   k=1 if one else int(k), one_per_person=one,
                   unit=tmeta.privacy_unit if person_level else None)
    alias = node.alias_or_name
    if alias in ctx.aliases:
        raise refuse(f"the table alias {alias!r} used twice", "give each table its own alias")
    ctx.aliases[alias] = ref
    ctx.refs.append(ref)
    return ref


def _compile_from(select: exp.Select, ctx: _Ctx, rows_per_person: int | None
                  ) -> tuple[str, str]:
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is None:
        raise refuse("a SELECT without FROM", "select from a permitted table")
    first = _resolve_table(from_.this, ctx, rows_per_person)
    parts = [f"{_q(first.table)} AS {first.alias}"]
    joins = select.args.get("joins") or []
    if len(joins) + 1 > MAX_JOIN_TABLES:
        raise refuse(f"more than {MAX_JOIN_TABLES} tables in one query")
    for join in joins:
        if join.args.get("using") or join.args.get("on") is None:
            raise refuse("a join without ON", "join with ON a.person_id = b.person_id")
        ref = _resolve_table(join.this, ctx, rows_per_person)
        on = join.args["on"]
        conds = on.flatten() if isinstance(on, exp.And) else [on]
        rendered = []
        person_join = False  # a condition that puts the joined rows on one person
        extra: list[exp.Expression] = []  # other conditions between person-level tables
        for cond in conds:
            if not isinstance(cond, exp.EQ):
                raise refuse("a join condition other than column = column",
                             "join with ON a.person_id = b.person_id")
            left, lref, lcol = _column(cond.this, ctx)
            right, rref, rcol = _column(cond.expression, ctx)
            if _col_kind(lcol) != _col_kind(rcol) or (_col_kind(lcol) == "other"
                                                     and lcol.type != rcol.type):
                raise refuse("a join on columns of different types "
                             f"({lcol.type} and {rcol.type})", "join columns of one type")
            if ref not in (lref, rref) or lref is rref:
                raise refuse("a join condition that does not link the joined table",
                             "join with ON a.person_id = b.person_id")
            unit = ctx.meta.privacy_unit
            if lref.person_level and rref.person_level:
                if lcol.name == unit and rcol.name == unit and lref.unit == unit \
                        and rref.unit == unit:
                    person_join = True
                elif (hop := _link_hop(lref, lcol, rref, rcol, ctx)) is not None:
                    person_join = True
                    child = lref if hop[0] == "left" else rref
                    if hop[1].when_column is not None:
                        rendered.append(f"{child.alias}.{_q(hop[1].when_column)} = "
                                        f"{_str_lit(str(hop[1].when_value))}")
                else:
                    extra.append(cond)
            else:
                refside, refcol = (lref, lcol) if not lref.person_level else (rref, rcol)
                if refside.person_level or refside is not ref \
                        or [refcol.name] != ctx.table_meta(refside).unique_key:
                    raise refuse("a join to a reference table not on its unique key",
                                 "join reference tables on their declared unique key")
                person_join = True
            rendered.append(f"{left} = {right}")
        if not person_join:
            if extra:
                raise refuse("a join between person-level tables not on person_id (or the "
                             "declared link of a linked table)",
                             "join person-level tables with ON a.person_id = b.person_id; "
                             "a linked table joins its parent on the declared key, e.g. "
                             "note_nlp.note_id = note.note_id")
            raise refuse("a join without a person_id or reference-key condition")
        if ref.person_level:
            # The joined rows belong to one person, whatever else the condition says: the
            # person columns (hidden for linked tables) are equal by construction on the
            # paths accepted above, and saying so makes the bound hold even if they were not.
            other = next(r for r in ctx.refs if r.person_level and r is not ref
                         and any(r in (_column(c.this, ctx)[1], _column(c.expression, ctx)[1])
                                 for c in conds))
            rendered.append(f"{ref.unit_sql} = {other.unit_sql}")
        parts.append(f"JOIN {_q(ref.table)} AS {ref.alias} ON " + " AND ".join(rendered))
    trunc = " AND ".join(f"{r.alias}.{_q(ROW_RANK_COLUMN)} <= {r.k}"
                         for r in ctx.refs if r.person_level and not r.one_per_person)
    if not any(r.person_level for r in ctx.refs):
        raise refuse("a query over reference tables only (no person-level table)",
                     "reference tables are public: aggregate a person-level table")
    return " ".join(parts), trunc or "TRUE"


def _link_hop(lref: TableRef, lcol: ColumnMeta, rref: TableRef, rcol: ColumnMeta,
              ctx: _Ctx) -> tuple[str, LinkHop] | None:
    """The declared hop that ``lcol = rcol`` follows (and which side is the linked child)."""
    for side, child, ccol, parent, pcol in (("left", lref, lcol, rref, rcol),
                                             ("right", rref, rcol, lref, lcol)):
        cmeta = ctx.table_meta(child)
        if cmeta.kind != "linked":
            continue
        for hop in cmeta.link:
            if hop.column == ccol.name and hop.table == parent.table \
                    and hop.parent_column == pcol.name:
                return side, hop
    return None


def _column(node: exp.Expression, ctx: _Ctx) -> tuple[str, TableRef, ColumnMeta]:
    """Resolve a column reference to (generated SQL, table, metadata) or refuse."""
    if not isinstance(node, exp.Column):
        raise refuse("a join condition on an expression", "join on plain columns")
    name = node.name
    table = node.table
    if node.args.get("db") or node.args.get("catalog"):
        raise refuse("a column qualified with a dataset", "write alias.column")
    if table:
        if table not in ctx.aliases:
            raise refuse(f"the table alias {table!r}, which is not in FROM")
        candidates = [ctx.aliases[table]]
    else:
        candidates = [r for r in ctx.refs if ctx.table_meta(r).column(name) is not None]
        if len(candidates) > 1:
            raise refuse(f"the ambiguous column {name!r}", "qualify it: alias.column")
    if not candidates:
        raise refuse(f"the column {name!r}, which is unknown or not granted by the permit")
    ref = candidates[0]
    col = ctx.table_meta(ref).column(name)
    allowed = ctx.terms.allowed_columns(ctx.dataset, ref.table)
    if col is None or name not in allowed or name == ROW_RANK_COLUMN:
        raise refuse(f"the column {name!r} of {ref.table!r}, which is unknown or not granted "
                     "by the permit", "use the permitted columns: " + ", ".join(sorted(
                         c for c in allowed if c != ROW_RANK_COLUMN)))
    return f"{ref.alias}.{_q(name)}", ref, col


def _is_numeric(col: ColumnMeta) -> bool:
    return col.type.upper().split("(")[0].strip() in NUMERIC_TYPES


def _is_date(col: ColumnMeta) -> bool:
    return col.type.upper().split("(")[0].strip() in DATE_TYPES


# Expressions -------------------------------------------------------------------------------

_BINARY = {exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/", exp.EQ: "=",
           exp.NEQ: "<>", exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<=",
           exp.And: "AND", exp.Or: "OR"}
_UNARY_FUNCS = {exp.Abs: "abs", exp.Lower: "lower", exp.Upper: "upper", exp.Floor: "floor",
                exp.Ceil: "ceil"}


def _literal(node: exp.Literal) -> str:
    if node.is_string:
        return _str_lit(str(node.this))
    value = float(node.this)
    if not math.isfinite(value):
        raise refuse("a non-finite numeric literal")
    return f"CAST({value!r} AS DOUBLE)"


def _part_of(node: exp.Expression) -> tuple[str, exp.Expression] | None:
    for cls, part in _NODE_PART.items():
        if isinstance(node, cls):
            return part, node.this
    if isinstance(node, exp.Extract):
        return _PARTS[node.this.name.lower()], node.expression
    if isinstance(node, exp.Anonymous) and str(node.this).lower() in ("date_part", "datepart"):
        return _PARTS[node.expressions[0].this.lower()], node.expressions[1]
    return None


def _render(node: exp.Expression, ctx: _Ctx, mode: str = "value") -> str:
    """Generate DuckDB SQL for an allow-listed scalar expression.

    Numeric columns and numeric literals are cast to DOUBLE so arithmetic cannot raise a
    data-dependent overflow error (it yields inf/NaN, handled by clamping instead).
    """
    if isinstance(node, AGGREGATES):
        raise refuse("an aggregate inside WHERE, GROUP BY or another expression",
                     "aggregates may appear only at the top of SELECT (and in HAVING)")
    if isinstance(node, exp.Column):
        sql, _ref, col = _column(node, ctx)
        return f"CAST({sql} AS DOUBLE)" if _is_numeric(col) else sql
    if isinstance(node, exp.Literal):
        return _literal(node)
    if isinstance(node, exp.Boolean):
        return "TRUE" if node.this else "FALSE"
    if isinstance(node, exp.Null):
        return "NULL"
    if isinstance(node, exp.Paren):
        return f"({_render(node.this, ctx, mode)})"
    if isinstance(node, exp.Neg):
        return f"(-{_render(node.this, ctx, mode)})"
    if isinstance(node, exp.Not):
        return f"(NOT {_render(node.this, ctx, mode)})"
    for cls, op in _BINARY.items():
        if type(node) is cls:
            return f"({_render(node.this, ctx)} {op} {_render(node.expression, ctx)})"
    if isinstance(node, exp.Is):
        target = node.expression
        if not isinstance(target, exp.Null | exp.Boolean):
            raise refuse("IS with something other than NULL/TRUE/FALSE")
        return f"({_render(node.this, ctx)} IS {_render(target, ctx)})"
    if isinstance(node, exp.In):
        items = node.expressions
        if not items or not all(isinstance(i, exp.Literal | exp.Null | exp.Boolean | exp.Neg
                                           | exp.Cast)
                                for i in items):
            raise refuse("IN with non-literal values", "list literal values: x IN (1, 2, 3)")
        return f"({_render(node.this, ctx)} IN ({', '.join(_render(i, ctx) for i in items)}))"
    if isinstance(node, exp.Between):
        return (f"({_render(node.this, ctx)} BETWEEN {_render(node.args['low'], ctx)} AND "
                f"{_render(node.args['high'], ctx)})")
    if isinstance(node, exp.Like | exp.ILike):
        pattern = node.expression
        if not (isinstance(pattern, exp.Literal) and pattern.is_string):
            raise refuse("LIKE with a non-literal pattern", "write LIKE 'text%'")
        op = "LIKE" if isinstance(node, exp.Like) else "ILIKE"
        return f"({_render(node.this, ctx)} {op} {_literal(pattern)})"
    if isinstance(node, exp.Case):
        subject = node.this
        out = ["CASE"]
        if subject is not None:
            out.append(_render(subject, ctx))
        for branch in node.args.get("ifs") or []:
            out.append(f"WHEN {_render(branch.this, ctx)} THEN "
                       f"{_render(branch.args['true'], ctx)}")
        default = node.args.get("default")
        if default is not None:
            out.append(f"ELSE {_render(default, ctx)}")
        out.append("END")
        return "(" + " ".join(out) + ")"
    if isinstance(node, exp.If):
        false = node.args.get("false")
        tail = f" ELSE {_render(false, ctx)}" if false is not None else ""
        return (f"(CASE WHEN {_render(node.this, ctx)} THEN {_render(node.args['true'], ctx)}"
                f"{tail} END)")
    if isinstance(node, exp.Coalesce | exp.Least | exp.Greatest):
        name = {exp.Coalesce: "coalesce", exp.Least: "least", exp.Greatest: "greatest"}[
            type(node)]
        args = [node.this, *node.expressions]
        return f"{name}({', '.join(_render(a, ctx) for a in args)})"
    for fcls, fname in _UNARY_FUNCS.items():
        if type(node) is fcls:
            return f"{fname}({_render(node.this, ctx)})"
    if isinstance(node, exp.Round):
        digits = node.args.get("decimals")
        if digits is not None and not (isinstance(digits, exp.Literal) and not digits.is_string):
            raise refuse("ROUND with non-literal digits")
        nd = f", {int(float(digits.this))}" if digits is not None else ""
        return f"round({_render(node.this, ctx)}{nd})"
    if isinstance(node, exp.Cast):
        to = node.args["to"].this
        text = str(node.this.this)
        try:
            if to == exp.DataType.Type.DATE:
                return f"DATE {_str_lit(date.fromisoformat(text).isoformat())}"
            stamp = datetime.fromisoformat(text)
            if stamp.tzinfo is not None:
                raise ValueError("time zone")
            return f"TIMESTAMP {_str_lit(stamp.isoformat(sep=' '))}"
        except ValueError as err:
            raise refuse("a malformed DATE/TIMESTAMP literal", "write DATE 'YYYY-MM-DD'") \
                from err
    part = _part_of(node)
    if part is not None:
        name, arg = part
        if not isinstance(arg, exp.Column):
            raise refuse("a date part of an expression", "take date parts of a date column")
        sql, _ref, col = _column(arg, ctx)
        if not _is_date(col):
            raise refuse(f"a date part of the non-date column {col.name!r}")
        part_sql = f"date_part({_str_lit(name)}, {sql})"
        # BIGINT date parts are DOUBLE in expressions (no INT64 overflow error in arithmetic);
        # a date part that is itself a group key keeps its integer type.
        return part_sql if mode == "key" else f"CAST({part_sql} AS DOUBLE)"
    raise refuse(f"the expression {type(node).__name__} here")


# Kinds of values (no data-dependent DuckDB errors) -------------------------------------------
#
# DuckDB raises at run time, per row, when it must cast a VARCHAR to a number, a date or a
# boolean, when a BIGINT product overflows, or when infinite timestamps are subtracted. Such an
# error depends on which rows reach the expression, so "did the query fail?" would be an exact,
# noise-free bit about the data (e.g. CASE WHEN person_id = 123 THEN name = 1 END fails iff
# person 123 has a row). Every expression is therefore checked here, from metadata only, to
# combine values of one kind: numbers with numbers (columns and date parts are DOUBLE, so
# arithmetic yields inf/NaN, never an error), strings with strings, dates with dates or with a
# string literal that is a valid ISO date/timestamp (rewritten to a typed literal, parsed by
# Python here and not by DuckDB per row), booleans where a condition is expected. Arithmetic
# applies to numbers only. Anything else is refused before data are touched.

_STR_TYPES = ("VARCHAR", "TEXT", "STRING", "CHAR", "BPCHAR")


def _col_kind(col: ColumnMeta) -> str:
    base = col.type.upper().split("(")[0].strip()
    if _is_numeric(col):
        return "num"
    if _is_date(col):
        return "date" if base == "DATE" else "ts"
    if base in ("BOOLEAN", "BOOL"):
        return "bool"
    if base in _STR_TYPES:
        return "str"
    return "other"


_KIND_NAMES = {"num": "a number", "str": "a string", "strlit": "a string", "date": "a date",
               "ts": "a timestamp",
               "bool": "a condition (true/false)", "other": "a value of an unsupported type"}


def _expect(node: exp.Expression, ctx: _Ctx, kind: str, what: str) -> None:
    got = _kind(node, ctx)
    if got == "null" or got == kind or (kind == "str" and got == "strlit"):
        return
    raise refuse(f"{_KIND_NAMES[got]} where {what} expects {_KIND_NAMES[kind]} "
                 f"({node.sql(dialect=DIALECT)[:60]})",
                 "compare values of the same kind (numbers with numbers, strings with "
                 "strings, dates with DATE '...' literals, timestamps with TIMESTAMP '...' "
                 "literals) and use date parts, not date arithmetic")


def _time_literal(node: exp.Expression, kind: str) -> None:
    """Replace a string literal compared with a date (``kind`` "date") or a timestamp
    ("ts") by a literal of that type, parsed here (or refuse): DATE and TIMESTAMP values
    are never compared with each other, so no implicit conversion runs per row."""
    lit = node
    while isinstance(lit, exp.Paren):
        lit = lit.this
    text = str(lit.this)
    try:
        if kind == "date":
            to, iso = "DATE", date.fromisoformat(text).isoformat()
        else:
            value = datetime.fromisoformat(text)
            if value.tzinfo is not None:
                raise ValueError("time zone")
            to, iso = "TIMESTAMP", value.isoformat(sep=" ")
    except ValueError as err:
        what, example = (("a date", "DATE '2020-01-31'") if kind == "date" else
                         ("a timestamp", "TIMESTAMP '2020-01-31 12:00:00'"))
        raise refuse(f"the string {text[:40]!r} compared with {what}",
                     f"write an ISO literal such as {example}") from err
    node.replace(exp.Cast(this=exp.Literal.string(iso), to=exp.DataType.build(to)))


def _unify(nodes: list[exp.Expression], ctx: _Ctx, what: str) -> str:
    kinds = [_kind(n, ctx) for n in nodes]
    present = {k for k in kinds if k not in ("null", "strlit")}
    if "other" in present or len(present) > 1:
        names = sorted({_KIND_NAMES[k] for k in kinds if k != "null"})
        raise refuse(f"{what} mixing {' and '.join(names)}",
                     "compare values of the same kind (numbers with numbers, strings with "
                     "strings, dates with DATE '...' literals, timestamps with "
                     "TIMESTAMP '...' literals; compare date parts such as YEAR(x) across "
                     "the two)")
    if not present:
        return "str" if "strlit" in kinds else "null"
    (kind,) = present
    if "strlit" in kinds:
        if kind in ("date", "ts"):
            for node, k in zip(nodes, kinds, strict=True):
                if k == "strlit":
                    _time_literal(node, kind)
        elif kind != "str":
            raise refuse(f"{what} mixing a string with {_KIND_NAMES[kind]}",
                         "compare values of the same kind")
    return kind


def _kind(node: exp.Expression, ctx: _Ctx) -> str:
    """The kind of value ``node`` yields (see above); refuses mixed or unsafe combinations."""
    if isinstance(node, exp.Paren):
        return _kind(node.this, ctx)
    if isinstance(node, exp.Column):
        return _col_kind(_column(node, ctx)[2])
    if isinstance(node, exp.Literal):
        return "strlit" if node.is_string else "num"
    if isinstance(node, exp.Boolean):
        return "bool"
    if isinstance(node, exp.Null):
        return "null"
    if isinstance(node, exp.Cast):
        return "date" if node.args["to"].this == exp.DataType.Type.DATE else "ts"
    if _part_of(node) is not None:
        return "num"
    if isinstance(node, exp.Neg | exp.Abs | exp.Floor | exp.Ceil | exp.Round):
        _expect(node.this, ctx, "num", "arithmetic")
        return "num"
    if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.Div):
        _expect(node.this, ctx, "num", "arithmetic")
        _expect(node.expression, ctx, "num", "arithmetic")
        return "num"
    if isinstance(node, exp.EQ | exp.NEQ | exp.GT | exp.GTE | exp.LT | exp.LTE):
        _unify([node.this, node.expression], ctx, "a comparison")
        return "bool"
    if isinstance(node, exp.And | exp.Or):
        _expect(node.this, ctx, "bool", "AND/OR")
        _expect(node.expression, ctx, "bool", "AND/OR")
        return "bool"
    if isinstance(node, exp.Not):
        _expect(node.this, ctx, "bool", "NOT")
        return "bool"
    if isinstance(node, exp.In):
        _unify([node.this, *node.expressions], ctx, "IN")
        return "bool"
    if isinstance(node, exp.Between):
        _unify([node.this, node.args["low"], node.args["high"]], ctx, "BETWEEN")
        return "bool"
    if isinstance(node, exp.Like | exp.ILike):
        _expect(node.this, ctx, "str", "LIKE")
        return "bool"
    if isinstance(node, exp.Is):
        if isinstance(node.expression, exp.Null):
            _kind(node.this, ctx)
        else:
            _expect(node.this, ctx, "bool", "IS TRUE/FALSE")
        return "bool"
    if isinstance(node, exp.Case | exp.If):
        if isinstance(node, exp.Case):
            ifs = node.args.get("ifs") or []
            if node.this is not None:
                _unify([node.this, *[b.this for b in ifs]], ctx, "CASE ... WHEN")
            else:
                for b in ifs:
                    _expect(b.this, ctx, "bool", "CASE WHEN")
            branches = [b.args["true"] for b in ifs]
            default = node.args.get("default")
        else:
            _expect(node.this, ctx, "bool", "IF")
            branches, default = [node.args["true"]], node.args.get("false")
        if default is not None:
            branches.append(default)
        return _unify(branches, ctx, "the results of CASE")
    if isinstance(node, exp.Coalesce | exp.Least | exp.Greatest):
        return _unify([node.this, *node.expressions], ctx, type(node).__name__.upper())
    if isinstance(node, exp.Lower | exp.Upper):
        _expect(node.this, ctx, "str", type(node).__name__.upper())
        return "str"
    return "other"


def _mentions_unit(node: exp.Expression, ctx: _Ctx) -> bool:
    return any(isinstance(n, exp.Column) and n.name == ctx.meta.privacy_unit
               for n in node.walk())


def _bounds(node: exp.Expression, ctx: _Ctx) -> tuple[float, float]:
    """Interval of values ``node`` can take (inf where nothing is declared)."""
    inf = math.inf
    if isinstance(node, exp.Column):
        _sql, _ref, col = _column(node, ctx)
        if _is_numeric(col):
            lo = col.lower if col.lower is not None else -inf
            hi = col.upper if col.upper is not None else inf
            return float(lo), float(hi)
        return -inf, inf
    if isinstance(node, exp.Literal):
        if node.is_string:
            return -inf, inf
        v = float(node.this)
        return v, v
    if isinstance(node, exp.Boolean):
        return (1.0, 1.0) if node.this else (0.0, 0.0)
    if isinstance(node, exp.Null):
        return inf, -inf  # empty interval: contributes nothing to unions
    if isinstance(node, exp.Paren):
        return _bounds(node.this, ctx)
    if isinstance(node, exp.Neg):
        lo, hi = _bounds(node.this, ctx)
        return -hi, -lo
    if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.Div):
        a = _bounds(node.this, ctx)
        b = _bounds(node.expression, ctx)
        if isinstance(node, exp.Add):
            return a[0] + b[0], a[1] + b[1]
        if isinstance(node, exp.Sub):
            return a[0] - b[1], a[1] - b[0]
        if isinstance(node, exp.Div):
            if not (b[0] == b[1] and b[0] != 0 and math.isfinite(b[0])):
                return -inf, inf
            b = (1.0 / b[0], 1.0 / b[0])
        prods = [x * y for x in a for y in b if not (math.isinf(x) and y == 0)
                 and not (math.isinf(y) and x == 0)]
        return (min(prods), max(prods)) if prods else (0.0, 0.0)
    if isinstance(node, exp.Case | exp.If | exp.Coalesce):
        if isinstance(node, exp.Case):
            branches = [b.args["true"] for b in node.args.get("ifs") or []]
            default = node.args.get("default")
        elif isinstance(node, exp.If):
            branches, default = [node.args["true"]], node.args.get("false")
        else:
            branches, default = [node.this, *node.expressions], None
        if default is not None:
            branches.append(default)
        ivs = [_bounds(b, ctx) for b in branches]
        return min(i[0] for i in ivs), max(i[1] for i in ivs)
    if isinstance(node, exp.Least | exp.Greatest):
        ivs = [_bounds(a, ctx) for a in [node.this, *node.expressions]]
        if isinstance(node, exp.Least):
            return min(i[0] for i in ivs), min(i[1] for i in ivs)
        return max(i[0] for i in ivs), max(i[1] for i in ivs)
    if isinstance(node, exp.Abs):
        lo, hi = _bounds(node.this, ctx)
        if lo >= 0:
            return lo, hi
        if hi <= 0:
            return -hi, -lo
        return 0.0, max(-lo, hi)
    if isinstance(node, exp.Floor | exp.Ceil | exp.Round):
        lo, hi = _bounds(node.this, ctx)
        return lo - 1, hi + 1
    if isinstance(node, exp.EQ | exp.NEQ | exp.GT | exp.GTE | exp.LT | exp.LTE | exp.And
                  | exp.Or | exp.Not | exp.In | exp.Between | exp.Like | exp.ILike | exp.Is):
        return 0.0, 1.0
    part = _part_of(node)
    if part is not None:
        name = part[0]
        return (float(DEFAULT_YEAR_RANGE[0]), float(DEFAULT_YEAR_RANGE[1])) if name == "year" \
            else tuple(float(x) for x in _PART_RANGES[name])  # type: ignore[return-value]
    return -inf, inf


def _grid(bound: float) -> float:
    """Power-of-two grid so one row contributes at most ~2048 grid units."""
    if bound <= 0:
        return 1.0
    return 2.0 ** math.floor(math.log2(bound / 1024.0))


# GROUP BY ------------------------------------------------------------------------------------

def _key_public_values(node: exp.Expression, ctx: _Ctx) -> tuple[Any, ...] | None:
    part = _part_of(node)
    if part is not None:
        name, arg = part
        if name == "year":
            _sql, _ref, col = _column(arg, ctx)
            # The declared calendar range (year_lower/year_upper, recorded at ingest) is the
            # public key set; rows outside it are filtered out by the key IN (...) filter.
            lo = col.year_lower if col.year_lower is not None else (
                int(col.lower) if col.lower is not None and col.lower > 1000
                else DEFAULT_YEAR_RANGE[0])
            hi = col.year_upper if col.year_upper is not None else (
                int(col.upper) if col.upper is not None and col.upper > 1000
                else DEFAULT_YEAR_RANGE[1])
            if lo > hi:
                raise refuse(f"the column {col.name!r}, whose declared year range is empty")
            return tuple(range(int(lo), int(hi) + 1))
        lo, hi = _PART_RANGES[name]
        return tuple(range(lo, hi + 1))
    if isinstance(node, exp.Column):
        _sql, _ref, col = _column(node, ctx)
        if col.public_values is not None:
            # Normalised again here (metadata recorded before ingest normalised it): a value
            # listed twice would be released twice with fresh noise, outside the accounting.
            kind = col.type.upper()
            if kind not in ("BIGINT", "VARCHAR"):
                return tuple(dict.fromkeys(col.public_values))
            try:
                return tuple(normalise_public_values(list(col.public_values), kind))
            except ValueError:
                raise QueryRefused(
                    f"The declared public values of {col.name!r} list one value in two "
                    "spellings; the data holder must correct the declaration.") from None
        if col.type.upper() == "BOOLEAN":
            return (False, True)
    return None


def _compile_group(select: exp.Select, ctx: _Ctx
                   ) -> tuple[list[GroupKey], list[exp.Expression]]:
    group = select.args.get("group")
    if group is None:
        return [], []
    if group.args.get("rollup") or group.args.get("cube") or group.args.get("grouping_sets"):
        raise refuse("ROLLUP/CUBE/GROUPING SETS", "run one query per grouping")
    aliases = {e.alias: e.this for e in select.expressions if isinstance(e, exp.Alias)}
    keys: list[GroupKey] = []
    nodes: list[exp.Expression] = []
    for item in group.expressions:
        node = item
        if isinstance(item, exp.Literal) and not item.is_string:
            idx = int(float(item.this)) - 1
            if not 0 <= idx < len(select.expressions):
                raise refuse("a GROUP BY position outside the SELECT list")
            node = select.expressions[idx]
            node = node.this if isinstance(node, exp.Alias) else node
        elif isinstance(item, exp.Column) and not item.table and item.name in aliases \
                and not any(ctx.table_meta(r).column(item.name) for r in ctx.refs):
            node = aliases[item.name]
        if _mentions_unit(node, ctx):
            raise refuse("GROUP BY the privacy unit (person_id) or an expression of it",
                         "group by attributes such as year or concept; use "
                         "COUNT(DISTINCT person_id) to count persons")
        if any(isinstance(n, AGGREGATES) for n in node.walk()):
            raise refuse("GROUP BY an aggregate")
        _kind(node, ctx)
        sql = _render(node, ctx, "key")
        # Group keys keep their native type (no DOUBLE cast) so outputs read naturally.
        if isinstance(node, exp.Column):
            sql = _column(node, ctx)[0]
        public = _key_public_values(node, ctx)
        name = _output_name(select, node, f"key{len(keys)}")
        keys.append(GroupKey(name=name, sql=sql, public_values=public))
        nodes.append(node)
    cells = _public_cells(keys)
    if cells > MAX_PUBLIC_CELLS:
        raise refuse(f"a public key grid of more than {MAX_PUBLIC_CELLS} cells",
                     "group by fewer or coarser keys")
    return keys, nodes


def _public_cells(keys: list[GroupKey]) -> int:
    cells = 1
    for key in keys:
        if key.public_values is not None:
            cells *= max(1, len(key.public_values))
    return cells


def quantile_candidates(agg: Aggregate) -> int:
    """Number of candidates on a quantile's power-of-two grid over [lower, upper]."""
    step = agg.grid
    return round(math.ceil(agg.upper / step) - math.floor(agg.lower / step)) + 1


def _output_name(select: exp.Select, node: exp.Expression, default: str) -> str:
    for item in select.expressions:
        inner = item.this if isinstance(item, exp.Alias) else item
        if inner == node:
            if isinstance(item, exp.Alias):
                return item.alias
            if isinstance(inner, exp.Column):
                return inner.name
    if isinstance(node, exp.Column):
        return node.name
    return default


# SELECT list ---------------------------------------------------------------------------------

def _compile_select(select: exp.Select, ctx: _Ctx, keys: list[GroupKey],
                    key_nodes: list[exp.Expression]) -> tuple[list[Aggregate], list[str]]:
    aggregates: list[Aggregate] = []
    columns: list[str] = []
    for i, item in enumerate(select.expressions):
        node = item.this if isinstance(item, exp.Alias) else item
        alias = item.alias if isinstance(item, exp.Alias) else None
        if isinstance(node, exp.Star):
            raise refuse("SELECT * (row-level output)", "select aggregates and group keys")
        if isinstance(node, AGGREGATES):
            agg = _compile_aggregate(node, ctx, alias or _default_agg_name(node, i))
            aggregates.append(agg)
            columns.append(agg.name)
            continue
        if any(isinstance(n, AGGREGATES) for n in node.walk()):
            raise refuse("arithmetic on aggregates in SELECT",
                         "select the aggregates and compute with the noisy output")
        matched = [k for k, n in zip(keys, key_nodes, strict=True) if n == node]
        if not matched:
            raise refuse("a selected column that is neither aggregated nor in GROUP BY",
                         "add it to GROUP BY or aggregate it")
        columns.append(matched[0].name)
    if len(set(columns)) != len(columns):
        raise refuse("two output columns with the same name", "give each column an alias")
    return aggregates, columns


def _default_agg_name(node: exp.Expression, index: int) -> str:
    base = type(node).__name__.lower()
    arg = node.this
    if isinstance(arg, exp.Column):
        return f"{base}_{arg.name}"
    if isinstance(arg, exp.Distinct):
        return "count_distinct_persons"
    if isinstance(arg, exp.Star):
        return "count"
    return f"{base}_{index}"


def _compile_aggregate(node: exp.Expression, ctx: _Ctx, name: str) -> Aggregate:
    agg = _compile_aggregate_kind(node, ctx, name)
    if agg.value_sql is not None:
        _sql, _lo, _hi, v = _clamped_input(node.this, ctx)
        agg = replace(agg, input_sql=v)
    return agg


def _compile_aggregate_kind(node: exp.Expression, ctx: _Ctx, name: str) -> Aggregate:
    arg = node.this
    if isinstance(node, exp.Count):
        if isinstance(arg, exp.Star):
            return Aggregate(name=name, kind="count")
        if isinstance(arg, exp.Distinct):
            cols = arg.expressions
            if len(cols) == 1 and isinstance(cols[0], exp.Column) \
                    and cols[0].name == ctx.meta.privacy_unit:
                _column(cols[0], ctx)
                return Aggregate(name=name, kind="count_distinct")
            raise refuse("COUNT(DISTINCT ...) of anything but person_id",
                         "use COUNT(DISTINCT person_id), or GROUP BY the column")
        if isinstance(arg, exp.Literal) and not arg.is_string:
            return Aggregate(name=name, kind="count")
        value_sql, lo, hi = _clamped(arg, ctx)
        # COUNT(expr) counts rows where the clamped value is not NULL.
        return Aggregate(name=name, kind="count", value_sql=value_sql, lower=lo, upper=hi)
    if isinstance(arg, exp.Distinct):
        raise refuse("DISTINCT inside this aggregate", "aggregate without DISTINCT")
    value_sql, lo, hi = _clamped(arg, ctx)
    bound = max(abs(lo), abs(hi))
    if isinstance(node, exp.Sum):
        return Aggregate(name, "sum", value_sql, lo, hi, _grid(bound))
    if isinstance(node, exp.Avg):
        return Aggregate(name, "avg", value_sql, lo, hi, _grid(bound))
    if isinstance(node, exp.Variance | exp.VariancePop):
        return Aggregate(name, "variance", value_sql, lo, hi, _grid(bound * bound),
                         population=isinstance(node, exp.VariancePop))
    if isinstance(node, exp.Stddev | exp.StddevSamp | exp.StddevPop):
        return Aggregate(name, "stddev", value_sql, lo, hi, _grid(bound),
                         population=isinstance(node, exp.StddevPop))
    # Quantiles
    if isinstance(node, exp.Median):
        alpha = 0.5
    else:
        q = node.args.get("quantile") or node.args.get("expression")
        if not (isinstance(q, exp.Literal) and not q.is_string):
            raise refuse("a quantile level that is not a number literal",
                         "write QUANTILE_CONT(x, 0.9)")
        alpha = float(q.this)
        if not 0.0 <= alpha <= 1.0:
            raise refuse("a quantile level outside [0, 1]")
    span = hi - lo
    return Aggregate(name, "quantile", value_sql, lo, hi, _grid(span) if span > 0 else 1.0,
                     alpha=round(alpha, 3))


def _clamped(arg: exp.Expression, ctx: _Ctx) -> tuple[str, float, float]:
    sql, lo, hi, _v = _clamped_input(arg, ctx)
    return sql, lo, hi


def _clamped_input(arg: exp.Expression, ctx: _Ctx) -> tuple[str, float, float, str]:
    """SQL for the aggregated value clamped to its bounds; NULL for NULL/NaN inputs.

    Bounds come from interval arithmetic over declared column bounds and literals, so
    ``SUM(CASE WHEN person_id = 123 THEN 1e6 ELSE 0 END)`` is bounded by [0, 1e6] and costs
    accordingly, and every row's value is forced into [lo, hi] before summing (``+inf`` to hi,
    ``-inf`` to lo). Unbounded expressions are refused.
    """
    if _kind(arg, ctx) not in ("num", "bool", "null"):
        raise refuse("an aggregate of a value that is not a number",
                     "aggregate numbers, or count rows with COUNT(*)")
    lo, hi = _bounds(arg, ctx)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise refuse("an aggregated expression without declared bounds",
                     "aggregate columns with declared bounds, or clamp explicitly: "
                     "LEAST(GREATEST(x, 0), 100)")
    if max(abs(lo), abs(hi)) > 1e15:
        raise refuse("an aggregated expression with bounds beyond 1e15")
    if 0 < max(abs(lo), abs(hi)) < 1e-100:  # the power-of-two grids of B and B^2 underflow
        raise refuse("an aggregated expression with bounds below 1e-100",
                     "scale the expression up and the result down")
    v = f"CAST({_render(arg, ctx)} AS DOUBLE)"
    return clamp_sql(v, float(lo), float(hi)), float(lo), float(hi), v


def clamp_sql(v: str, lo: float, hi: float) -> str:
    """``v`` (a DOUBLE expression or column) clamped to [lo, hi]; NULL for NULL and NaN."""
    return (f"(CASE WHEN {v} IS NULL OR isnan({v}) THEN NULL "
            f"ELSE least(greatest({v}, {lo!r}), {hi!r}) END)")



# HAVING / ORDER BY / LIMIT (post-processing of the noisy table) ------------------------------

def _compile_post(select: exp.Select, ctx: _Ctx, aggregates: list[Aggregate],
                  keys: list[GroupKey], key_nodes: list[exp.Expression]) -> PostStep:
    agg_nodes: dict[str, str] = {}
    for item in select.expressions:
        node = item.this if isinstance(item, exp.Alias) else item
        if isinstance(node, AGGREGATES):
            idx = len(agg_nodes)
            agg_nodes[node.sql(dialect=DIALECT)] = aggregates[idx].name
    outputs = {a.name for a in aggregates} | {k.name for k in keys}
    key_by_sql = {n.sql(dialect=DIALECT): k.name for k, n in zip(keys, key_nodes, strict=True)}

    def out(node: exp.Expression) -> str:
        text = node.sql(dialect=DIALECT)
        if isinstance(node, AGGREGATES):
            if text not in agg_nodes:
                raise refuse("an aggregate in HAVING/ORDER BY that is not in SELECT",
                             "add the aggregate to SELECT")
            return _q(agg_nodes[text])
        if text in key_by_sql and not isinstance(node, exp.Literal):
            return _q(key_by_sql[text])
        if isinstance(node, exp.Column):
            if node.name in outputs and not node.table:
                return _q(node.name)
            raise refuse(f"the column {node.name!r} in HAVING/ORDER BY",
                         "refer to output columns or aliases")
        if isinstance(node, exp.Literal):
            return _literal(node)
        if isinstance(node, exp.Paren):
            return f"({out(node.this)})"
        if isinstance(node, exp.Neg):
            return f"(-{out(node.this)})"
        if isinstance(node, exp.Not):
            return f"(NOT {out(node.this)})"
        if isinstance(node, exp.Null | exp.Boolean):
            return _render(node, ctx)
        if isinstance(node, exp.Is):
            return f"({out(node.this)} IS {_render(node.expression, ctx)})"
        for cls, op in _BINARY.items():
            if type(node) is cls:
                return f"({out(node.this)} {op} {out(node.expression)})"
        raise refuse(f"the expression {type(node).__name__} in HAVING/ORDER BY")

    having = select.args.get("having")
    having_sql = out(having.this) if having is not None else None
    order_sql = None
    order = select.args.get("order")
    if order is not None:
        parts = []
        for o in order.expressions:
            node = o.this
            if isinstance(node, exp.Literal) and not node.is_string:
                idx = int(float(node.this)) - 1
                cols = [a.name for a in aggregates] + [k.name for k in keys]
                ordered = _select_columns(select, aggregates, keys, key_nodes)
                if not 0 <= idx < len(ordered):
                    raise refuse("an ORDER BY position outside the SELECT list")
                del cols
                expr = _q(ordered[idx])
            else:
                expr = out(node)
            parts.append(f"{expr} {'DESC' if o.args.get('desc') else 'ASC'} NULLS LAST")
        order_sql = ", ".join(parts)
    limit = None
    lim = select.args.get("limit")
    if lim is not None:
        value = lim.expression if lim.expression is not None else lim.this
        if not (isinstance(value, exp.Literal) and not value.is_string
                and float(value.this).is_integer() and float(value.this) >= 0):
            raise refuse("a LIMIT that is not a non-negative integer literal")
        limit = int(float(value.this))
    if select.args.get("offset"):
        raise refuse("OFFSET", "use ORDER BY and LIMIT on the noisy output")
    return PostStep(having_sql=having_sql, order_sql=order_sql, limit=limit)


def _select_columns(select: exp.Select, aggregates: list[Aggregate], keys: list[GroupKey],
                    key_nodes: list[exp.Expression]) -> list[str]:
    names = []
    agg_iter = iter(aggregates)
    for item in select.expressions:
        node = item.this if isinstance(item, exp.Alias) else item
        if isinstance(node, AGGREGATES):
            names.append(next(agg_iter).name)
        else:
            names.extend(k.name for k, n in zip(keys, key_nodes, strict=True) if n == node)
    return names
