"""Compile an allow-listed SELECT into a :class:`QueryPlan` and generate its SQL.

Contract: :func:`compile_plan` takes the tree from :func:`spe.dp.parse.parse`, the dataset's
:class:`~spe.datasets.metadata.DatasetMetadata` and the permit's terms, and returns a frozen
plan or raises :class:`spe.errors.QueryRefused`. It reads metadata only, never data. Every
SQL fragment in the plan is *generated* by :func:`spe.dp.expressions.render` from allowed nodes:
identifiers are re-quoted, string literals re-escaped, numbers re-printed from parsed floats;
user text is never copied into the SQL that DuckDB runs.

Contribution bounds recorded in the plan (used by :mod:`spe.dp.mechanisms`):

* ``rows_per_person`` (K): every person-level table in FROM/JOIN is filtered to
  ``_spe_row_rank <= k_t`` (the rank is a uniformly random rank of the row among the person's
  rows, fixed at ingest). After inner joins on ``person_id`` a person has at most
  ``prod(k_t)`` joined rows (each joined row is one choice of a kept row per table); joins to a
  reference table on a key checked unique at ingest add no rows. Any WHERE filter only removes
  rows. So one person changes at most K rows of the table being aggregated, in at most K groups.
* ``groups_per_person`` (m): COUNT(DISTINCT person_id) is computed on the truncated rows like
  every other statistic (see :func:`spe.dp.engine.distinct_sql`: bounded work per person). A
  person adds at most 1 to each group's distinct count; with GROUP BY each person keeps at most
  m of their groups (chosen by a salted hash, so a person in at most m groups is never dropped).

Where things live: the plan's types in :mod:`spe.dp.plan_types`, scalar expressions (columns,
kinds of values, bounds, rendering) in :mod:`spe.dp.expressions`, SQL quoting in
:mod:`spe.dp.sqltext`; this module compiles FROM/JOIN, GROUP BY, the SELECT list and the
post-processing of the noisy table.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

from sqlglot import exp

from permits.terms import PermitTerms
from spe.datasets.defaults import normalise_public_values
from spe.datasets.metadata import (
    ROW_RANK_COLUMN,
    ColumnMeta,
    DatasetMetadata,
    LinkHop,
    refusal_text,
)
from spe.dp.derived import compile_derived
from spe.dp.expressions import (
    BINARY_OPS,
    DEFAULT_YEAR_RANGE,
    PART_RANGES,
    Ctx,
    bounds,
    col_kind,
    column_ref,
    expect,
    grid_for,
    kind_of,
    literal_sql,
    mentions_unit,
    part_of,
    render,
)
from spe.dp.parse import AGGREGATES, DIALECT, refuse
from spe.dp.plan_types import (
    AggKind,
    Aggregate,
    GroupKey,
    PostStep,
    QueryPlan,
    TableRef,
)
from spe.dp.sqltext import clamp_sql, quote_ident, str_lit
from spe.errors import QueryRefused

__all__ = ["AggKind", "Aggregate", "GroupKey", "PostStep", "QueryPlan", "TableRef",
           "clamp_sql", "compile_plan", "quantile_candidates"]

MAX_PUBLIC_CELLS = 100_000
#: Bound on the work a plan may ask of the engine: public cells x (quantile candidates for a
#: quantile, 1 otherwise) summed over aggregates. Checked from metadata, before data are read.
MAX_PLAN_WORK = 5_000_000
#: Released column names: identifiers the engine can print verbatim (no researcher prose).
OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
MAX_ROWS_PER_PERSON = 1_000
MAX_JOIN_TABLES = 4


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
    ctx = Ctx(meta=meta, terms=terms, dataset=meta.name)
    join_sql, trunc = _compile_from(select, ctx, rows_per_person)
    where = select.args.get("where")
    if where is not None:
        expect(where.this, ctx, "bool", "WHERE")
    for item in select.expressions:  # group keys and their SELECT copies, before matching
        inner = item.this if isinstance(item, exp.Alias) else item
        if not any(isinstance(n, AGGREGATES) for n in inner.walk()):
            kind_of(inner, ctx)
    where_sql = render(where.this, ctx, "bool") if where is not None else None
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
    work = _public_cells(keys) * sum(quantile_candidates(a) if a.kind is AggKind.QUANTILE else 1
                                     for a in aggregates)
    if work > MAX_PLAN_WORK:
        raise refuse(f"a query whose public cells x quantile candidates x aggregates "
                     f"({work:,}) exceed {MAX_PLAN_WORK:,}",
                     "group by fewer or coarser keys, or ask for fewer quantiles")
    post = _compile_post(select, ctx, aggregates, keys, key_nodes)
    person_rows = [ctx.table_meta(r).row_count for r in ctx.refs if r.person_level]
    return QueryPlan(
        dataset=meta.name, tables=tuple(ctx.refs), join_sql=join_sql, truncation_sql=trunc,
        where_sql=where_sql, keys=tuple(keys), aggregates=tuple(aggregates),
        columns=tuple(columns), post=post, rows_per_person=k_total, groups_per_person=m,
        epsilon=float(epsilon), delta=float(delta),
        max_rows=k_total * min(person_rows) if person_rows else None,
    )


# FROM / JOIN ------------------------------------------------------------------------------

def _resolve_table(node: exp.Table, ctx: Ctx, rows_per_person: int | None) -> TableRef:
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
        reason = tmeta.refusal or refusal_text(name)
        raise QueryRefused(
            f"Refused: {reason[0].upper()}{reason[1:]}. Until then the table cannot be queried; "
            "ask the data holder to declare it, or query per-person tables.")
    person_level = tmeta.person_level
    if person_level and tmeta.privacy_unit is None:
        raise QueryRefused(f"The table {name!r} has no recorded privacy unit; it cannot be "
                           "queried until the dataset is ingested again.")
    k = rows_per_person or tmeta.max_rows_per_person if person_level else 1
    # A table whose unique key (checked at ingest) is the privacy unit holds at most one row
    # per person: rank <= k keeps every row for any k >= 1, so the filter is dropped and the
    # table counts 1 (not k) in the product K; the stability argument is unchanged.
    one = tmeta.kind == "person" and tmeta.unique_key == [ctx.meta.privacy_unit]
    ref = TableRef(alias=f"{ctx.alias_prefix}{len(ctx.refs)}", table=name,
                   person_level=person_level,
                   k=1 if one else int(k), one_per_person=one,
                   unit=tmeta.privacy_unit if person_level else None)
    alias = node.alias_or_name
    if alias in ctx.aliases:
        raise refuse(f"the table alias {alias!r} used twice", "give each table its own alias")
    ctx.aliases[alias] = ref
    ctx.refs.append(ref)
    return ref


def _common_tables(select: exp.Select, ctx: Ctx) -> dict[str, exp.Select]:
    """The query's WITH tables by name (each a derived table, see :mod:`spe.dp.derived`)."""
    with_ = select.args.get("with_") or select.args.get("with")
    out: dict[str, exp.Select] = {}
    for cte in with_.expressions if with_ is not None else []:
        name = cte.alias
        if name in out:
            raise refuse(f"the WITH name {name!r} defined twice", "give each its own name")
        if name in ctx.meta.tables:
            raise refuse(f"the WITH name {name!r}, which is also a table of the dataset",
                         "name common table expressions differently from tables")
        out[name] = cte.this
    return out


def _resolve_source(node: exp.Expression, ctx: Ctx, rows_per_person: int | None,
                    common: dict[str, exp.Select]) -> TableRef:
    """A FROM / JOIN item: a stored table, or a derived table (subquery or WITH name)."""
    if isinstance(node, exp.Table) and (node.args.get("db") or node.name not in common):
        return _resolve_table(node, ctx, rows_per_person)
    if isinstance(node, exp.Table):
        select, alias = common[node.name], node.alias_or_name
    elif isinstance(node, exp.Subquery) and isinstance(node.this, exp.Select) and node.alias:
        select, alias = node.this, node.alias
    else:
        raise refuse("this FROM / JOIN item", "select from a permitted table by name")
    if alias in ctx.aliases:
        raise refuse(f"the table alias {alias!r} used twice", "give each table its own alias")
    ref = compile_derived(select, alias, ctx,
                          lambda table, sub: _resolve_table(table, sub, None))
    ctx.aliases[alias] = ref
    ctx.refs.append(ref)
    return ref


def _compile_from(select: exp.Select, ctx: Ctx, rows_per_person: int | None
                  ) -> tuple[str, str]:
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is None:
        raise refuse("a SELECT without FROM", "select from a permitted table")
    common = _common_tables(select, ctx)
    first = _resolve_source(from_.this, ctx, rows_per_person, common)
    parts = [first.from_sql]
    joins = select.args.get("joins") or []
    if len(joins) + 1 > MAX_JOIN_TABLES:
        raise refuse(f"more than {MAX_JOIN_TABLES} tables in one query")
    for join in joins:
        if join.args.get("using") or join.args.get("on") is None:
            raise refuse("a join without ON", "join with ON a.person_id = b.person_id")
        ref = _resolve_source(join.this, ctx, rows_per_person, common)
        on = join.args["on"]
        conds = list(on.flatten()) if isinstance(on, exp.And) else [on]  # read twice
        rendered = []
        person_join = False  # a condition that puts the joined rows on one person
        extra: list[exp.Expression] = []  # other conditions between person-level tables
        for cond in conds:
            if not isinstance(cond, exp.EQ):
                raise refuse("a join condition other than column = column",
                             "join with ON a.person_id = b.person_id")
            left, lref, lcol = column_ref(cond.this, ctx)
            right, rref, rcol = column_ref(cond.expression, ctx)
            if col_kind(lcol) != col_kind(rcol) or (col_kind(lcol) == "other"
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
                        rendered.append(f"{child.alias}.{quote_ident(hop[1].when_column)} = "
                                        f"{str_lit(str(hop[1].when_value))}")
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
                         and any(r in (column_ref(c.this, ctx)[1], column_ref(c.expression, ctx)[1])
                                 for c in conds))
            same = {f"{ref.unit_sql} = {other.unit_sql}", f"{other.unit_sql} = {ref.unit_sql}"}
            if not same & set(rendered):  # not already said by the researcher's condition
                rendered.append(f"{ref.unit_sql} = {other.unit_sql}")
        parts.append(f"JOIN {ref.from_sql} ON " + " AND ".join(rendered))
    trunc = _truncation_sql(ctx, select.args.get("where"))
    if not any(r.person_level for r in ctx.refs):
        raise refuse("a query over reference tables only (no person-level table)",
                     "reference tables are public: aggregate a person-level table")
    return " ".join(parts), trunc or "TRUE"


def _truncation_sql(ctx: Ctx, where: exp.Expression | None) -> str:
    """The rank filters ``rank <= k`` of every truncated table, ANDed ("" when none).

    Join order. DuckDB estimates every filtered table at 20 % of its rows and builds its hash
    table on the side it estimates smaller; the rank filters make every truncated table look
    filtered, so a truncated table that keeps most of its rows could be built on where the raw
    query builds on a table the researcher's WHERE filters (measured: +36 % peak memory). When
    two or more truncated tables are joined, the filter of the largest one (metadata row
    count) that the WHERE does not read is written so that it references another joined
    table's rank (``rank + 0 * other_rank <= k``): DuckDB cannot push it into that table's
    scan and applies it in the join instead, so it sees that table unfiltered, as the raw
    query does (a table the WHERE filters looks filtered either way: it keeps its pushdown).
    Ranks are never NULL, so the filter keeps exactly the same rows.
    Work stays linear in each person's rows: the deferred table's rows of a person meet at
    most the product of the other tables' k kept rows.
    """
    rank = quote_ident(ROW_RANK_COLUMN)
    truncated = [r for r in ctx.refs if r.person_level and not r.one_per_person]
    deferred: TableRef | None = None
    if len(truncated) >= 2:
        filtered = {column_ref(c, ctx)[1].alias for c in where.find_all(exp.Column)} \
            if where is not None else set()
        unfiltered = [r for r in truncated if r.alias not in filtered]
        if unfiltered:
            deferred = max(unfiltered, key=lambda r: ctx.table_meta(r).row_count)
    parts = []
    for ref in truncated:
        if ref is deferred:
            other = next(r for r in truncated if r is not ref)
            parts.append(f"({ref.alias}.{rank} + 0 * {other.alias}.{rank}) <= {ref.k}")
        else:
            parts.append(f"{ref.alias}.{rank} <= {ref.k}")
    return " AND ".join(parts)


def _link_hop(lref: TableRef, lcol: ColumnMeta, rref: TableRef, rcol: ColumnMeta,
              ctx: Ctx) -> tuple[str, LinkHop] | None:
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


# GROUP BY ------------------------------------------------------------------------------------

def _key_public_values(node: exp.Expression, ctx: Ctx) -> tuple[Any, ...] | None:
    part = part_of(node)
    if part is not None:
        name, arg = part
        if name == "year":
            _sql, _ref, col = column_ref(arg, ctx)
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
        lo, hi = PART_RANGES[name]
        return tuple(range(lo, hi + 1))
    if isinstance(node, exp.Column):
        _sql, _ref, col = column_ref(node, ctx)
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


def _compile_group(select: exp.Select, ctx: Ctx
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
        if mentions_unit(node, ctx):
            raise refuse("GROUP BY the privacy unit (person_id) or an expression of it",
                         "group by attributes such as year or concept; use "
                         "COUNT(DISTINCT person_id) to count persons")
        if any(isinstance(n, AGGREGATES) for n in node.walk()):
            raise refuse("GROUP BY an aggregate")
        kind_of(node, ctx)
        sql = render(node, ctx, "key")
        # Group keys keep their native type (no DOUBLE cast) so outputs read naturally.
        if isinstance(node, exp.Column):
            sql = column_ref(node, ctx)[0]
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

def _compile_select(select: exp.Select, ctx: Ctx, keys: list[GroupKey],
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


def _compile_aggregate(node: exp.Expression, ctx: Ctx, name: str) -> Aggregate:
    agg = _compile_aggregate_kind(node, ctx, name)
    if agg.value_sql is not None:
        _sql, _lo, _hi, v = _clamped_input(node.this, ctx)
        agg = replace(agg, input_sql=v)
    return agg


def _compile_aggregate_kind(node: exp.Expression, ctx: Ctx, name: str) -> Aggregate:
    arg = node.this
    if isinstance(node, exp.Count):
        if isinstance(arg, exp.Star):
            return Aggregate(name=name, kind=AggKind.COUNT)
        if isinstance(arg, exp.Distinct):
            cols = arg.expressions
            if len(cols) == 1 and isinstance(cols[0], exp.Column) \
                    and cols[0].name == ctx.meta.privacy_unit:
                column_ref(cols[0], ctx)
                return Aggregate(name=name, kind=AggKind.COUNT_DISTINCT)
            raise refuse("COUNT(DISTINCT ...) of anything but person_id",
                         "use COUNT(DISTINCT person_id), or GROUP BY the column")
        if isinstance(arg, exp.Literal) and not arg.is_string:
            return Aggregate(name=name, kind=AggKind.COUNT)
        value_sql, lo, hi = _clamped(arg, ctx)
        # COUNT(expr) counts rows where the clamped value is not NULL.
        return Aggregate(name=name, kind=AggKind.COUNT, value_sql=value_sql, lower=lo, upper=hi)
    if isinstance(arg, exp.Distinct):
        raise refuse("DISTINCT inside this aggregate", "aggregate without DISTINCT")
    value_sql, lo, hi = _clamped(arg, ctx)
    bound = max(abs(lo), abs(hi))
    if isinstance(node, exp.Sum):
        return Aggregate(name, AggKind.SUM, value_sql, lo, hi, grid_for(bound))
    if isinstance(node, exp.Avg):
        return Aggregate(name, AggKind.AVG, value_sql, lo, hi, grid_for(bound))
    if isinstance(node, exp.Variance | exp.VariancePop):
        return Aggregate(name, AggKind.VARIANCE, value_sql, lo, hi, grid_for(bound * bound),
                         population=isinstance(node, exp.VariancePop))
    if isinstance(node, exp.Stddev | exp.StddevSamp | exp.StddevPop):
        return Aggregate(name, AggKind.STDDEV, value_sql, lo, hi, grid_for(bound),
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
    return Aggregate(name, AggKind.QUANTILE, value_sql, lo, hi, grid_for(span) if span > 0 else 1.0,
                     alpha=round(alpha, 3))


def _clamped(arg: exp.Expression, ctx: Ctx) -> tuple[str, float, float]:
    sql, lo, hi, _v = _clamped_input(arg, ctx)
    return sql, lo, hi


def _clamped_input(arg: exp.Expression, ctx: Ctx) -> tuple[str, float, float, str]:
    """SQL for the aggregated value clamped to its bounds; NULL for NULL/NaN inputs.

    Bounds come from interval arithmetic over declared column bounds and literals, so
    ``SUM(CASE WHEN person_id = 123 THEN 1e6 ELSE 0 END)`` is bounded by [0, 1e6] and costs
    accordingly, and every row's value is forced into [lo, hi] before summing (``+inf`` to hi,
    ``-inf`` to lo). Unbounded expressions are refused.
    """
    if kind_of(arg, ctx) not in ("num", "bool", "null"):
        raise refuse("an aggregate of a value that is not a number",
                     "aggregate numbers, or count rows with COUNT(*)")
    lo, hi = bounds(arg, ctx)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise refuse("an aggregated expression without declared bounds",
                     "aggregate columns with declared bounds, or clamp explicitly: "
                     "LEAST(GREATEST(x, 0), 100)")
    if max(abs(lo), abs(hi)) > 1e15:
        raise refuse("an aggregated expression with bounds beyond 1e15")
    if 0 < max(abs(lo), abs(hi)) < 1e-100:  # the power-of-two grids of B and B^2 underflow
        raise refuse("an aggregated expression with bounds below 1e-100",
                     "scale the expression up and the result down")
    v = f"CAST({render(arg, ctx)} AS DOUBLE)"
    return clamp_sql(v, float(lo), float(hi)), float(lo), float(hi), v


# HAVING / ORDER BY / LIMIT (post-processing of the noisy table) ------------------------------

def _compile_post(select: exp.Select, ctx: Ctx, aggregates: list[Aggregate],
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
            return quote_ident(agg_nodes[text])
        if text in key_by_sql and not isinstance(node, exp.Literal):
            return quote_ident(key_by_sql[text])
        if isinstance(node, exp.Column):
            if node.name in outputs and not node.table:
                return quote_ident(node.name)
            raise refuse(f"the column {node.name!r} in HAVING/ORDER BY",
                         "refer to output columns or aliases")
        if isinstance(node, exp.Literal):
            return literal_sql(node)
        if isinstance(node, exp.Paren):
            return f"({out(node.this)})"
        if isinstance(node, exp.Neg):
            return f"(-{out(node.this)})"
        if isinstance(node, exp.Not):
            return f"(NOT {out(node.this)})"
        if isinstance(node, exp.Null | exp.Boolean):
            return render(node, ctx)
        if isinstance(node, exp.Is):
            return f"({out(node.this)} IS {render(node.expression, ctx)})"
        for cls, op in BINARY_OPS.items():
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
                expr = quote_ident(ordered[idx])
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
