"""Scalar expressions of a DP query: column resolution, kinds of values, bounds, SQL.

Contract: every function here reads the plan context (metadata and permit terms) only, never
data; :func:`render` generates DuckDB SQL from allow-listed sqlglot nodes (identifiers
re-quoted, string literals re-escaped, numbers re-printed from parsed floats); :func:`kind_of`
refuses any combination of values whose evaluation could raise a data-dependent error;
:func:`bounds` gives the interval an expression can take from declared column bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlglot import exp

from permits.terms import PermitTerms
from spe.datasets.metadata import ROW_RANK_COLUMN, ColumnMeta, DatasetMetadata, TableMeta
from spe.dp.parse import AGGREGATES, DIALECT, refuse
from spe.dp.plan_types import TableRef
from spe.dp.sqltext import quote_ident, str_lit

NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "INT", "BIGINT", "HUGEINT", "UTINYINT",
                 "USMALLINT", "UINTEGER", "UBIGINT", "FLOAT", "REAL", "DOUBLE", "DECIMAL",
                 "NUMERIC")
DATE_TYPES = ("DATE", "TIMESTAMP", "TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE", "DATETIME")
DEFAULT_YEAR_RANGE = (1900, datetime.now(UTC).year)
PARTS = {"year": "year", "month": "month", "quarter": "quarter", "day": "day",
          "dayofweek": "dayofweek", "dow": "dayofweek", "dayofyear": "dayofyear",
          "doy": "dayofyear"}
PART_RANGES = {"month": (1, 12), "quarter": (1, 4), "day": (1, 31), "dayofweek": (0, 6),
                "dayofyear": (1, 366)}
NODE_PART = {exp.Year: "year", exp.Month: "month", exp.Quarter: "quarter", exp.Day: "day",
              exp.DayOfWeek: "dayofweek", exp.DayOfYear: "dayofyear"}



@dataclass
class Ctx:
    meta: DatasetMetadata
    terms: PermitTerms
    dataset: str
    aliases: dict[str, TableRef] = field(default_factory=dict)  # user alias -> ref
    refs: list[TableRef] = field(default_factory=list)
    #: per-person derived tables (see :mod:`spe.dp.derived`), by generated alias
    derived: dict[str, TableMeta] = field(default_factory=dict)
    alias_prefix: str = "t"  # generated aliases: t0, t1, ... (d0_0, ... inside a derived table)

    def table_meta(self, ref: TableRef) -> TableMeta:
        if ref.source_sql is not None:
            return self.derived[ref.alias]
        return self.meta.tables[ref.table]

    def allowed(self, ref: TableRef) -> frozenset[str]:
        """The columns of ``ref`` a query may name: the permit's grant, or a derived table's
        outputs (each computed from granted columns only)."""
        if ref.source_sql is not None:
            return frozenset(c.name for c in self.derived[ref.alias].columns)
        return self.terms.allowed_columns(self.dataset, ref.table)


def column_ref(node: exp.Expression, ctx: Ctx) -> tuple[str, TableRef, ColumnMeta]:
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
    allowed = ctx.allowed(ref)
    if col is None or name not in allowed or name == ROW_RANK_COLUMN:
        raise refuse(f"the column {name!r} of {ref.table!r}, which is unknown or not granted "
                     "by the permit", "use the permitted columns: " + ", ".join(sorted(
                         c for c in allowed if c != ROW_RANK_COLUMN)))
    return f"{ref.alias}.{quote_ident(name)}", ref, col


def is_numeric(col: ColumnMeta) -> bool:
    return col.type.upper().split("(")[0].strip() in NUMERIC_TYPES


def is_date(col: ColumnMeta) -> bool:
    return col.type.upper().split("(")[0].strip() in DATE_TYPES


# Expressions -------------------------------------------------------------------------------

BINARY_OPS = {exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/", exp.EQ: "=",
           exp.NEQ: "<>", exp.GT: ">", exp.GTE: ">=", exp.LT: "<", exp.LTE: "<=",
           exp.And: "AND", exp.Or: "OR"}
_UNARY_FUNCS = {exp.Abs: "abs", exp.Lower: "lower", exp.Upper: "upper", exp.Floor: "floor",
                exp.Ceil: "ceil"}


def literal_sql(node: exp.Literal) -> str:
    if node.is_string:
        return str_lit(str(node.this))
    value = float(node.this)
    if not math.isfinite(value):
        raise refuse("a non-finite numeric literal")
    return f"CAST({value!r} AS DOUBLE)"


def part_of(node: exp.Expression) -> tuple[str, exp.Expression] | None:
    for cls, part in NODE_PART.items():
        if isinstance(node, cls):
            return part, node.this
    if isinstance(node, exp.Extract):
        return PARTS[node.this.name.lower()], node.expression
    if isinstance(node, exp.Anonymous) and str(node.this).lower() in ("date_part", "datepart"):
        return PARTS[node.expressions[0].this.lower()], node.expressions[1]
    return None


def render(node: exp.Expression, ctx: Ctx, mode: str = "value") -> str:
    """Generate DuckDB SQL for an allow-listed scalar expression.

    Numeric columns and numeric literals are cast to DOUBLE so arithmetic cannot raise a
    data-dependent overflow error (it yields inf/NaN, handled by clamping instead).
    """
    if isinstance(node, AGGREGATES):
        raise refuse("an aggregate inside WHERE, GROUP BY or another expression",
                     "aggregates may appear only at the top of SELECT (and in HAVING)")
    if isinstance(node, exp.Column):
        sql, _ref, col = column_ref(node, ctx)
        return f"CAST({sql} AS DOUBLE)" if is_numeric(col) else sql
    if isinstance(node, exp.Literal):
        return literal_sql(node)
    if isinstance(node, exp.Boolean):
        return "TRUE" if node.this else "FALSE"
    if isinstance(node, exp.Null):
        return "NULL"
    if isinstance(node, exp.Paren):
        return f"({render(node.this, ctx, mode)})"
    if isinstance(node, exp.Neg):
        return f"(-{render(node.this, ctx, mode)})"
    if isinstance(node, exp.Not):
        return f"(NOT {render(node.this, ctx, mode)})"
    for cls, op in BINARY_OPS.items():
        if type(node) is cls:
            return f"({render(node.this, ctx)} {op} {render(node.expression, ctx)})"
    if isinstance(node, exp.Is):
        target = node.expression
        if not isinstance(target, exp.Null | exp.Boolean):
            raise refuse("IS with something other than NULL/TRUE/FALSE")
        return f"({render(node.this, ctx)} IS {render(target, ctx)})"
    if isinstance(node, exp.In):
        items = node.expressions
        if not items or not all(isinstance(i, exp.Literal | exp.Null | exp.Boolean | exp.Neg
                                           | exp.Cast)
                                for i in items):
            raise refuse("IN with non-literal values", "list literal values: x IN (1, 2, 3)")
        return f"({render(node.this, ctx)} IN ({', '.join(render(i, ctx) for i in items)}))"
    if isinstance(node, exp.Between):
        return (f"({render(node.this, ctx)} BETWEEN {render(node.args['low'], ctx)} AND "
                f"{render(node.args['high'], ctx)})")
    if isinstance(node, exp.Like | exp.ILike):
        pattern = node.expression
        if not (isinstance(pattern, exp.Literal) and pattern.is_string):
            raise refuse("LIKE with a non-literal pattern", "write LIKE 'text%'")
        op = "LIKE" if isinstance(node, exp.Like) else "ILIKE"
        return f"({render(node.this, ctx)} {op} {literal_sql(pattern)})"
    if isinstance(node, exp.Case):
        subject = node.this
        out = ["CASE"]
        if subject is not None:
            out.append(render(subject, ctx))
        for branch in node.args.get("ifs") or []:
            out.append(f"WHEN {render(branch.this, ctx)} THEN "
                       f"{render(branch.args['true'], ctx)}")
        default = node.args.get("default")
        if default is not None:
            out.append(f"ELSE {render(default, ctx)}")
        out.append("END")
        return "(" + " ".join(out) + ")"
    if isinstance(node, exp.If):
        false = node.args.get("false")
        tail = f" ELSE {render(false, ctx)}" if false is not None else ""
        return (f"(CASE WHEN {render(node.this, ctx)} THEN {render(node.args['true'], ctx)}"
                f"{tail} END)")
    if isinstance(node, exp.Coalesce | exp.Least | exp.Greatest):
        name = {exp.Coalesce: "coalesce", exp.Least: "least", exp.Greatest: "greatest"}[
            type(node)]
        args = [node.this, *node.expressions]
        return f"{name}({', '.join(render(a, ctx) for a in args)})"
    for fcls, fname in _UNARY_FUNCS.items():
        if type(node) is fcls:
            return f"{fname}({render(node.this, ctx)})"
    if isinstance(node, exp.Round):
        digits = node.args.get("decimals")
        if digits is not None and not (isinstance(digits, exp.Literal) and not digits.is_string):
            raise refuse("ROUND with non-literal digits")
        nd = f", {int(float(digits.this))}" if digits is not None else ""
        return f"round({render(node.this, ctx)}{nd})"
    if isinstance(node, exp.Cast):
        to = node.args["to"].this
        text = str(node.this.this)
        try:
            if to == exp.DataType.Type.DATE:
                return f"DATE {str_lit(date.fromisoformat(text).isoformat())}"
            stamp = datetime.fromisoformat(text)
            if stamp.tzinfo is not None:
                raise ValueError("time zone")
            return f"TIMESTAMP {str_lit(stamp.isoformat(sep=' '))}"
        except ValueError as err:
            raise refuse("a malformed DATE/TIMESTAMP literal", "write DATE 'YYYY-MM-DD'") \
                from err
    part = part_of(node)
    if part is not None:
        name, arg = part
        if not isinstance(arg, exp.Column):
            raise refuse("a date part of an expression", "take date parts of a date column")
        sql, _ref, col = column_ref(arg, ctx)
        if not is_date(col):
            raise refuse(f"a date part of the non-date column {col.name!r}")
        part_sql = f"date_part({str_lit(name)}, {sql})"
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


def col_kind(col: ColumnMeta) -> str:
    base = col.type.upper().split("(")[0].strip()
    if is_numeric(col):
        return "num"
    if is_date(col):
        return "date" if base == "DATE" else "ts"
    if base in ("BOOLEAN", "BOOL"):
        return "bool"
    if base in _STR_TYPES:
        return "str"
    return "other"


_KIND_NAMES = {"num": "a number", "str": "a string", "strlit": "a string", "date": "a date",
               "ts": "a timestamp",
               "bool": "a condition (true/false)", "other": "a value of an unsupported type"}


def expect(node: exp.Expression, ctx: Ctx, kind: str, what: str) -> None:
    got = kind_of(node, ctx)
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


def unify(nodes: list[exp.Expression], ctx: Ctx, what: str) -> str:
    kinds = [kind_of(n, ctx) for n in nodes]
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


def kind_of(node: exp.Expression, ctx: Ctx) -> str:
    """The kind of value ``node`` yields (see above); refuses mixed or unsafe combinations."""
    if isinstance(node, exp.Paren):
        return kind_of(node.this, ctx)
    if isinstance(node, exp.Column):
        return col_kind(column_ref(node, ctx)[2])
    if isinstance(node, exp.Literal):
        return "strlit" if node.is_string else "num"
    if isinstance(node, exp.Boolean):
        return "bool"
    if isinstance(node, exp.Null):
        return "null"
    if isinstance(node, exp.Cast):
        return "date" if node.args["to"].this == exp.DataType.Type.DATE else "ts"
    if part_of(node) is not None:
        return "num"
    if isinstance(node, exp.Neg | exp.Abs | exp.Floor | exp.Ceil | exp.Round):
        expect(node.this, ctx, "num", "arithmetic")
        return "num"
    if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.Div):
        expect(node.this, ctx, "num", "arithmetic")
        expect(node.expression, ctx, "num", "arithmetic")
        return "num"
    if isinstance(node, exp.EQ | exp.NEQ | exp.GT | exp.GTE | exp.LT | exp.LTE):
        unify([node.this, node.expression], ctx, "a comparison")
        return "bool"
    if isinstance(node, exp.And | exp.Or):
        expect(node.this, ctx, "bool", "AND/OR")
        expect(node.expression, ctx, "bool", "AND/OR")
        return "bool"
    if isinstance(node, exp.Not):
        expect(node.this, ctx, "bool", "NOT")
        return "bool"
    if isinstance(node, exp.In):
        unify([node.this, *node.expressions], ctx, "IN")
        return "bool"
    if isinstance(node, exp.Between):
        unify([node.this, node.args["low"], node.args["high"]], ctx, "BETWEEN")
        return "bool"
    if isinstance(node, exp.Like | exp.ILike):
        expect(node.this, ctx, "str", "LIKE")
        return "bool"
    if isinstance(node, exp.Is):
        if isinstance(node.expression, exp.Null):
            kind_of(node.this, ctx)
        else:
            expect(node.this, ctx, "bool", "IS TRUE/FALSE")
        return "bool"
    if isinstance(node, exp.Case | exp.If):
        if isinstance(node, exp.Case):
            ifs = node.args.get("ifs") or []
            if node.this is not None:
                unify([node.this, *[b.this for b in ifs]], ctx, "CASE ... WHEN")
            else:
                for b in ifs:
                    expect(b.this, ctx, "bool", "CASE WHEN")
            branches = [b.args["true"] for b in ifs]
            default = node.args.get("default")
        else:
            expect(node.this, ctx, "bool", "IF")
            branches, default = [node.args["true"]], node.args.get("false")
        if default is not None:
            branches.append(default)
        return unify(branches, ctx, "the results of CASE")
    if isinstance(node, exp.Coalesce | exp.Least | exp.Greatest):
        return unify([node.this, *node.expressions], ctx, type(node).__name__.upper())
    if isinstance(node, exp.Lower | exp.Upper):
        expect(node.this, ctx, "str", type(node).__name__.upper())
        return "str"
    return "other"


def mentions_unit(node: exp.Expression, ctx: Ctx) -> bool:
    return any(isinstance(n, exp.Column) and n.name == ctx.meta.privacy_unit
               for n in node.walk())


def bounds(node: exp.Expression, ctx: Ctx) -> tuple[float, float]:
    """Interval of values ``node`` can take (inf where nothing is declared)."""
    inf = math.inf
    if isinstance(node, exp.Column):
        _sql, _ref, col = column_ref(node, ctx)
        if is_numeric(col):
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
        return bounds(node.this, ctx)
    if isinstance(node, exp.Neg):
        lo, hi = bounds(node.this, ctx)
        return -hi, -lo
    if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.Div):
        a = bounds(node.this, ctx)
        b = bounds(node.expression, ctx)
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
        ivs = [bounds(b, ctx) for b in branches]
        return min(i[0] for i in ivs), max(i[1] for i in ivs)
    if isinstance(node, exp.Least | exp.Greatest):
        ivs = [bounds(a, ctx) for a in [node.this, *node.expressions]]
        if isinstance(node, exp.Least):
            return min(i[0] for i in ivs), min(i[1] for i in ivs)
        return max(i[0] for i in ivs), max(i[1] for i in ivs)
    if isinstance(node, exp.Abs):
        lo, hi = bounds(node.this, ctx)
        if lo >= 0:
            return lo, hi
        if hi <= 0:
            return -hi, -lo
        return 0.0, max(-lo, hi)
    if isinstance(node, exp.Floor | exp.Ceil | exp.Round):
        lo, hi = bounds(node.this, ctx)
        return lo - 1, hi + 1
    if isinstance(node, exp.EQ | exp.NEQ | exp.GT | exp.GTE | exp.LT | exp.LTE | exp.And
                  | exp.Or | exp.Not | exp.In | exp.Between | exp.Like | exp.ILike | exp.Is):
        return 0.0, 1.0
    part = part_of(node)
    if part is not None:
        name = part[0]
        return (float(DEFAULT_YEAR_RANGE[0]), float(DEFAULT_YEAR_RANGE[1])) if name == "year" \
            else tuple(float(x) for x in PART_RANGES[name])  # type: ignore[return-value]
    return -inf, inf


def grid_for(bound: float) -> float:
    """Power-of-two grid so one row contributes at most ~2048 grid units."""
    if bound <= 0:
        return 1.0
    return 2.0 ** math.floor(math.log2(bound / 1024.0))
