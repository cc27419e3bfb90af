"""Per-person derived tables: one row per person, computed from one per-person table.

A researcher's "age at first diagnosis" needs each person's first date before the histogram.
The engine accepts exactly this shape, as a subquery in FROM / JOIN (with an alias) or as a
common table expression (``WITH f AS (...)``)::

    SELECT person_id, MIN(col) AS first_x, MAX(col) AS last_x, COUNT(*) AS n
    FROM <per-person table> [AS alias] [WHERE <filter on that table>]
    GROUP BY person_id

and nothing else inside it: one per-person table (no join, no nested subquery), GROUP BY the
privacy unit alone, ``person_id`` selected once under its own name, and any number of
``MIN(column)`` / ``MAX(column)`` of a granted number, date or timestamp column (not the unit)
and ``COUNT(*)``, each with a plain name.

Contract: :func:`compile_derived` reads metadata only and returns a :class:`TableRef` whose
``source_sql`` is the generated SQL (identifiers re-quoted, the WHERE rendered by
:func:`spe.dp.expressions.render`; no researcher text) and registers the derived table's
metadata in the context (:attr:`Ctx.derived`), or raises :class:`spe.errors.QueryRefused`
naming the construct.

Why the bounds of :mod:`spe.dp.plan` hold unchanged. Each derived row is a function of one
person's rows of one table: the WHERE reads that table's columns only, and the grouping is by
the privacy unit, so adding or removing a person adds, removes or changes exactly one derived
row (that person's) and no other. The derived table is therefore a table with at most one row
per person, like OMOP ``person``: it gets no rank filter and counts 1 in the product K, and
the outer query's stability argument (at most K rows per person, at most m groups) is the same.

Bounded work per person ("no side channel is free", DESIGN 4): the per-person aggregation reads
at most :data:`DERIVED_ROWS_PER_PERSON` rows of each person (``rank <= cap``, the uniformly
random rank fixed at ingest), so one person with very many rows cannot make the answer slower
than any other person with ``cap`` rows. A person with more rows than the cap gets MIN / MAX /
COUNT over a random ``cap`` of them (documented; ``COUNT(*)`` is bounded by the cap anyway).

Values: ``MIN`` / ``MAX`` keep the source column's type and declared bounds (the minimum of
values in [lo, hi] lies in [lo, hi]); ``COUNT(*)`` is a BIGINT in [1, cap]. The outer engine
clamps to these bounds exactly as for stored columns.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from sqlglot import exp

from spe.datasets.metadata import ROW_RANK_COLUMN, ColumnMeta, TableMeta
from spe.dp.expressions import Ctx, col_kind, column_ref, expect, render
from spe.dp.parse import refuse
from spe.dp.plan_types import TableRef
from spe.dp.sqltext import quote_ident

#: Rows of one person a derived table reads at most (by the ingest rank).
DERIVED_ROWS_PER_PERSON = 1_000
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
_SHAPE = ("SELECT person_id, MIN(col) AS name, MAX(col) AS name, COUNT(*) AS name FROM "
          "one_per_person_table [WHERE ...] GROUP BY person_id")

Resolve = Callable[[exp.Table, Ctx], TableRef]


def compile_derived(select: exp.Select, name: str, ctx: Ctx, resolve: Resolve) -> TableRef:
    """Compile a derived table named ``name`` in the query (see module doc)."""
    index = len(ctx.refs)
    alias = f"{ctx.alias_prefix}{index}"
    sub = Ctx(meta=ctx.meta, terms=ctx.terms, dataset=ctx.dataset, alias_prefix=f"d{index}_")
    for key in ("joins", "having", "order", "limit", "offset", "distinct"):
        if select.args.get(key):
            raise refuse(f"{key.upper().removesuffix('S')} inside the derived table {name!r}",
                         f"a derived table has the shape {_SHAPE}")
    from_ = select.args.get("from_") or select.args.get("from")
    if from_ is None or not isinstance(from_.this, exp.Table):
        raise refuse(f"a derived table {name!r} that does not read one table",
                     f"a derived table has the shape {_SHAPE}")
    src = resolve(from_.this, sub)
    unit = ctx.meta.privacy_unit
    if not src.person_level or sub.table_meta(src).kind != "person" or src.unit != unit:
        raise refuse(f"a derived table over {src.table!r}, which does not carry {unit}",
                     f"derive per-person values from a per-person table: {_SHAPE}")
    _check_group(select, sub, src, name, unit)
    where = select.args.get("where")
    if where is not None:
        expect(where.this, sub, "bool", "WHERE")
    columns: list[ColumnMeta] = []
    parts: list[str] = []
    for item in select.expressions:
        inner = item.this if isinstance(item, exp.Alias) else item
        given = item.alias if isinstance(item, exp.Alias) else None
        if isinstance(inner, exp.Column):
            sql, _ref, col = column_ref(inner, sub)
            if col.name != unit or (given is not None and given != unit):
                raise refuse(f"the column {inner.name!r} selected in the derived table {name!r}",
                             f"select {unit} and aggregates: {_SHAPE}")
            parts.append(f"{sql} AS {quote_ident(unit)}")
            columns.append(col.model_copy(update={"nullable": False}))
        elif isinstance(inner, exp.Min | exp.Max):
            arg = inner.this
            if inner.expressions or not isinstance(arg, exp.Column):
                raise refuse(f"MIN / MAX of an expression in the derived table {name!r}",
                             "take MIN or MAX of a plain column")
            sql, _ref, col = column_ref(arg, sub)
            if col.name in (unit, ROW_RANK_COLUMN) or col_kind(col) not in ("num", "date", "ts"):
                raise refuse(f"MIN / MAX of the column {col.name!r} in the derived table {name!r}",
                             "take MIN or MAX of a number, date or timestamp column")
            fn = "MIN" if isinstance(inner, exp.Min) else "MAX"
            out = _name(given, f"{fn.lower()}_{col.name}", name, unit)
            parts.append(f"{fn}({sql}) AS {quote_ident(out)}")
            columns.append(col.model_copy(update={"name": out, "nullable": True}))
        elif isinstance(inner, exp.Count) and isinstance(inner.this, exp.Star) \
                and not inner.args.get("distinct"):
            out = _name(given, "n", name, unit)
            parts.append(f"COUNT(*) AS {quote_ident(out)}")
            columns.append(ColumnMeta(name=out, type="BIGINT", nullable=False, lower=1,
                                      upper=DERIVED_ROWS_PER_PERSON))
        else:
            raise refuse(f"this expression in the derived table {name!r}",
                         f"a derived table has the shape {_SHAPE}")
    names = [c.name.lower() for c in columns]  # DuckDB matches names without case
    if names.count(unit.lower()) != 1:
        raise refuse(f"a derived table {name!r} that does not select {unit} exactly once",
                     f"a derived table has the shape {_SHAPE}")
    if len(set(names)) != len(names):
        raise refuse(f"two columns with the same name in the derived table {name!r}",
                     "give each aggregate its own alias")
    if len(columns) < 2:
        raise refuse(f"a derived table {name!r} without MIN, MAX or COUNT(*)",
                     f"a derived table has the shape {_SHAPE}")
    conds = [f"{src.unit_sql} IS NOT NULL"]
    if not src.one_per_person:
        conds.append(f"{src.alias}.{quote_ident(ROW_RANK_COLUMN)} <= {DERIVED_ROWS_PER_PERSON}")
    if where is not None:
        conds.append(f"({render(where.this, sub, 'bool')})")
    sql = (f"SELECT {', '.join(parts)} FROM {src.from_sql} WHERE {' AND '.join(conds)} "
           f"GROUP BY {src.unit_sql}")
    source = sub.table_meta(src)
    ctx.derived[alias] = TableMeta(
        name=source.name, columns=columns, row_count=source.row_count, kind="person",
        privacy_unit=unit, max_rows_per_person=1, unique_key=[unit])
    return TableRef(alias=alias, table=src.table, person_level=True, k=1, one_per_person=True,
                    unit=unit, source_sql=sql)


def _check_group(select: exp.Select, sub: Ctx, src: TableRef, name: str, unit: str) -> None:
    group = select.args.get("group")
    items = list(group.expressions) if group is not None else []
    if group is not None and (group.args.get("rollup") or group.args.get("cube")
                              or group.args.get("grouping_sets")):
        items = []
    if len(items) == 1 and isinstance(items[0], exp.Column):
        _sql, ref, col = column_ref(items[0], sub)
        if ref is src and col.name == unit:
            return
    raise refuse(f"a derived table {name!r} not grouped by {unit} alone",
                 f"a derived table has the shape {_SHAPE}")


def _name(given: str | None, default: str, table: str, unit: str) -> str:
    """An aggregate's output name: a plain identifier, never the privacy unit's name (a value
    named ``person_id`` would be joined as if it were the person: one person's row could then
    meet many derived rows)."""
    out = given if given is not None else default
    if not _NAME.fullmatch(out):
        raise refuse(f"the column name {out[:70]!r} in the derived table {table!r}",
                     "name columns with a letter then letters, digits and '_'")
    if out.lower() == unit.lower():
        raise refuse(f"an aggregate named {unit} in the derived table {table!r}",
                     f"{unit} names only the grouped person; give the aggregate another name")
    return out
