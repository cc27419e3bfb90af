"""Parse researcher SQL (DuckDB dialect) and allow-list its syntax.

Contract: :func:`parse` returns one validated ``sqlglot`` ``Select`` tree or raises
:class:`spe.errors.QueryRefused` naming the refused construct and, where there is one, the
supported alternative. It never touches data and never looks at a schema: table and column
checks against the permit and the dataset metadata happen in :mod:`spe.dp.plan`.

The check is an allow-list over AST node classes: anything not listed below is refused, so
new sqlglot node types (or DuckDB features) are refused by default. The text is never sent to
DuckDB; :mod:`spe.dp.plan` compiles the tree into a plan and :mod:`spe.dp.engine` generates
fresh SQL from that plan.
"""

from __future__ import annotations

import logging
import math

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from spe.errors import QueryRefused

MAX_SQL_CHARS = 20_000
#: Deepest nesting of parentheses and of expression trees accepted. Deeper trees are refused
#: before any recursive step (sqlglot's parser and generator, the planner) could hit Python's
#: recursion limit; the checks are iterative and linear in the query's length.
MAX_DEPTH = 64
DIALECT = "duckdb"

logging.getLogger("sqlglot").setLevel(logging.ERROR)

#: Aggregates the engine answers with DP mechanisms.
AGGREGATES: tuple[type[exp.Expression], ...] = (
    exp.Count, exp.Sum, exp.Avg, exp.Variance, exp.VariancePop, exp.Stddev, exp.StddevPop,
    exp.StddevSamp, exp.Median, exp.Quantile, exp.PercentileCont, exp.PercentileDisc,
)

#: Scalar node classes allowed in expressions (WHERE, GROUP BY, aggregate arguments).
SCALAR_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Paren, exp.Neg,
    exp.Add, exp.Sub, exp.Mul, exp.Div, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE,
    exp.And, exp.Or, exp.Not, exp.In, exp.Between, exp.Like, exp.ILike, exp.Is, exp.Case,
    exp.If, exp.Coalesce, exp.Year, exp.Month, exp.Quarter, exp.Day, exp.DayOfWeek,
    exp.DayOfYear, exp.Extract, exp.Var, exp.Abs, exp.Lower, exp.Upper, exp.Least,
    exp.Greatest, exp.Cast, exp.DataType, exp.Floor, exp.Ceil, exp.Round, exp.Tuple,
)

#: Nodes allowed only in their structural place in the SELECT.
STRUCTURE_NODES: tuple[type[exp.Expression], ...] = (
    exp.Select, exp.From, exp.Table, exp.TableAlias, exp.Join, exp.Where, exp.Group,
    exp.Having, exp.Order, exp.Ordered, exp.Limit, exp.Alias, exp.Star, exp.Distinct,
)

DATE_PARTS = frozenset({"year", "month", "quarter", "day", "dayofweek", "dow", "dayofyear",
                        "doy"})
CAST_LITERAL_TYPES = frozenset({exp.DataType.Type.DATE, exp.DataType.Type.TIMESTAMP,
                                exp.DataType.Type.TIMESTAMPNTZ})  # TIMESTAMP '...' in DuckDB

# Named refusals with the supported alternative: checked before the generic allow-list.
_REFUSALS: tuple[tuple[type[exp.Expression], str], ...] = (
    (exp.Min, "MIN is not released under DP; use QUANTILE_CONT(x, 0.05) (a DP quantile)"),
    (exp.Max, "MAX is not released under DP; use QUANTILE_CONT(x, 0.95) (a DP quantile)"),
    (exp.Window, "window functions (OVER) are not supported; use GROUP BY"),
    (exp.With, "WITH other than at the top of the query; define per-person derived tables "
               "in one WITH at the top: WITH f AS (SELECT person_id, MIN(col) AS first FROM "
               "table GROUP BY person_id)"),
    (exp.Subquery, "a subquery here; per-person derived tables go in FROM / JOIN: (SELECT "
                   "person_id, MIN(col) AS first FROM table GROUP BY person_id) AS f, other "
                   "data through joins on person_id"),
    (exp.Exists, "EXISTS subqueries are not supported; use an inner join on person_id"),
    (exp.Union, "UNION is not supported; run separate queries"),
    (exp.Intersect, "INTERSECT is not supported; run separate queries"),
    (exp.Except, "EXCEPT is not supported; run separate queries"),
    (exp.Lateral, "LATERAL is not supported"),
    (exp.Pivot, "PIVOT is not supported; use GROUP BY"),
    (exp.Unnest, "UNNEST is not supported"),
    (exp.Qualify, "QUALIFY is not supported; use HAVING on the noisy output"),
    (exp.Placeholder, "query parameters are not supported; write literals"),
    (exp.Parameter, "query parameters are not supported; write literals"),
    (exp.Dot, "struct field access is not supported"),
    (exp.Bracket, "list/struct indexing is not supported"),
    (exp.Lambda, "lambda functions are not supported"),
)

_STATEMENT_NAMES: dict[type[exp.Expression], str] = {
    exp.Copy: "COPY", exp.Attach: "ATTACH", exp.Detach: "DETACH", exp.Install: "INSTALL",
    exp.Set: "SET", exp.Pragma: "PRAGMA", exp.Insert: "INSERT", exp.Update: "UPDATE",
    exp.Delete: "DELETE", exp.Create: "CREATE", exp.Drop: "DROP", exp.Use: "USE",
    exp.Describe: "DESCRIBE", exp.Alter: "ALTER", exp.Merge: "MERGE",
}


def refuse(construct: str, alternative: str | None = None) -> QueryRefused:
    """A QueryRefused naming ``construct`` (and the supported alternative when given)."""
    msg = f"Refused: {construct}."
    if alternative:
        msg += f" Supported alternative: {alternative}."
    return QueryRefused(msg, errors=[{"construct": construct, "alternative": alternative}])


def _tokenize_with_dialect(sql: str) -> None:
    dialect = sqlglot.Dialect.get_or_raise(DIALECT)
    try:
        tokens = dialect.tokenize(sql)
    except (TokenError, ValueError) as err:
        raise refuse("text that cannot be tokenised as SQL") from err
    for token in tokens:
        if token.comments:
            raise refuse("SQL comments", "remove comments from the query text")
    depth = 0
    for token in tokens:
        if token.token_type in (sqlglot.TokenType.L_PAREN, sqlglot.TokenType.L_BRACKET,
                                sqlglot.TokenType.L_BRACE):
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_deep()
        elif token.token_type in (sqlglot.TokenType.R_PAREN, sqlglot.TokenType.R_BRACKET,
                                  sqlglot.TokenType.R_BRACE):
            depth -= 1
    semis = [i for i, t in enumerate(tokens) if t.token_type == sqlglot.TokenType.SEMICOLON]
    if len(semis) > 1 or (semis and semis[0] != len(tokens) - 1):
        raise refuse("more than one statement", "send exactly one SELECT statement")


def _too_deep() -> QueryRefused:
    return refuse(f"expressions nested more than {MAX_DEPTH} levels deep",
                  "split the expression or the query into simpler ones")


def _check_depth(tree: exp.Expr) -> None:
    """Refuse trees deeper than MAX_DEPTH (iterative: no recursion on the tree itself).

    Long chains of binary operators (``a + a + ... + a``, ``x = 1 OR x = 2 OR ...``) parse
    into trees as deep as the chain is long even without parentheses.
    """
    stack: list[tuple[exp.Expr, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        for child in node.iter_expressions():
            stack.append((child, depth + 1))


def parse(sql: str) -> exp.Select:
    """Parse ``sql`` into one allow-listed SELECT tree, or raise QueryRefused."""
    if not isinstance(sql, str) or not sql.strip():
        raise refuse("an empty query", "send one SELECT statement")
    if len(sql) > MAX_SQL_CHARS:
        raise refuse(f"a query longer than {MAX_SQL_CHARS} characters")
    if "\x00" in sql:
        raise refuse("a NUL character in the query text")
    _tokenize_with_dialect(sql)
    try:
        trees = [t for t in sqlglot.parse(sql, read=DIALECT) if t is not None]
    except (ParseError, TokenError) as err:
        raise refuse("text that is not valid DuckDB SQL",
                     "send one SELECT statement in the DuckDB dialect") from err
    except RecursionError:
        raise _too_deep() from None
    for tree in trees:
        _check_depth(tree)
    if len(trees) != 1:
        raise refuse("more than one statement", "send exactly one SELECT statement")
    tree = trees[0]
    if isinstance(tree, exp.Command):
        name = str(tree.this).upper()
        raise refuse(f"the {name} statement", "send one SELECT statement")
    for cls, name in _STATEMENT_NAMES.items():
        if isinstance(tree, cls):
            raise refuse(f"the {name} statement", "send one SELECT statement")
    for cls, reason in _REFUSALS:
        if isinstance(tree, cls):
            raise _split(reason)
    if not isinstance(tree, exp.Select):
        raise refuse(f"the statement kind {type(tree).__name__}", "send one SELECT statement")
    _check_select(tree)
    return tree


def _split(reason: str) -> QueryRefused:
    if "; " in reason:
        what, alt = reason.split("; ", 1)
        return refuse(what, alt)
    return refuse(reason)


_DERIVED = ("a subquery outside FROM / JOIN",
            "derive per-person values in FROM or WITH: (SELECT person_id, MIN(col) AS first "
            "FROM table GROUP BY person_id) AS f, joined on person_id")


def _check_select(select: exp.Select, derived: bool = False) -> None:
    """Check one SELECT; ``derived``: a per-person derived table inside the query (a subquery
    in FROM / JOIN or a WITH table, see :mod:`spe.dp.derived`), which may hold MIN / MAX but
    no WITH, subquery or join of its own."""
    for key in ("distinct", "qualify", "with_", "with", "into", "kind", "windows", "prewhere",
                "connect", "match", "laterals", "settings", "format", "sample", "options"):
        value = select.args.get(key)
        if value:
            if key == "distinct":
                raise refuse("SELECT DISTINCT", "use GROUP BY (group keys are released "
                             "with DP) or COUNT(DISTINCT person_id)")
            if key in ("with_", "with") and not derived:
                _check_with(value)
                continue
            if key in ("with_", "with"):
                raise refuse("WITH inside a derived table", "define every WITH table at the "
                             "top of the query")
            raise refuse(f"the SELECT clause {key.upper()}")
    if not select.args.get("from_") and not select.args.get("from"):
        raise refuse("a SELECT without FROM", "select from a permitted table")
    if derived:
        for key in ("joins", "having", "order", "limit", "offset"):
            if select.args.get(key):
                raise refuse(f"{key.upper().removesuffix('S')} inside a derived table",
                             "a derived table reads one table: SELECT person_id, MIN(col) AS "
                             "name FROM table [WHERE ...] GROUP BY person_id")

    def checked_apart(node: exp.Expr) -> bool:
        return node is not select and isinstance(node, exp.Subquery | exp.With)

    for node in select.walk(prune=checked_apart):
        assert isinstance(node, exp.Expression)
        if node is not select and isinstance(node, exp.With):
            if derived or node.parent is not select:
                raise _split(dict(_REFUSALS)[exp.With])
            continue  # checked by _check_with above
        if node is not select and isinstance(node, exp.Subquery):
            _check_subquery(node, select, derived)
            continue
        _check_node(node, select, derived)


def _check_with(with_: exp.Expression) -> None:
    if not isinstance(with_, exp.With) or with_.args.get("recursive"):
        raise refuse("WITH RECURSIVE", "derive per-person values with one WITH table per step")
    for cte in with_.expressions:
        alias = cte.args.get("alias")
        if not isinstance(cte, exp.CTE) or not isinstance(cte.this, exp.Select) \
                or not isinstance(alias, exp.TableAlias) or alias.columns \
                or any(v for k, v in cte.args.items() if k not in ("this", "alias")):
            raise refuse("this WITH table", "WITH name AS (SELECT person_id, MIN(col) AS first "
                         "FROM table GROUP BY person_id)")
        _check_select(cte.this, derived=True)


def _check_subquery(node: exp.Subquery, root: exp.Select, derived: bool) -> None:
    """A subquery is allowed only as a derived table in the top query's FROM / JOIN."""
    holder = node.parent
    if derived or not isinstance(holder, exp.From | exp.Join) or holder.parent is not root \
            or holder.this is not node:
        raise refuse(*_DERIVED)
    alias = node.args.get("alias")
    if not isinstance(node.this, exp.Select) or not isinstance(alias, exp.TableAlias) \
            or alias.columns or not alias.name \
            or any(v for k, v in node.args.items() if k not in ("this", "alias")):
        raise refuse("a subquery in FROM / JOIN that is not a named derived table",
                     "write (SELECT person_id, MIN(col) AS first FROM table GROUP BY "
                     "person_id) AS f")
    _check_select(node.this, derived=True)


def _check_node(node: exp.Expression, root: exp.Select, derived: bool = False) -> None:
    if derived and isinstance(node, exp.Min | exp.Max) and (
            node.parent is root or (isinstance(node.parent, exp.Alias)
                                    and node.parent.parent is root)):
        return  # a derived table's per-person MIN / MAX (its argument is walked on)
    for cls, reason in _REFUSALS:
        if isinstance(node, cls):
            raise _split(reason)
    if isinstance(node, exp.Select) and node is not root:
        raise _split(dict(_REFUSALS)[exp.Subquery])
    if isinstance(node, exp.Anonymous):
        name = str(node.this).lower()
        if name in ("date_part", "datepart") and _date_part_ok(node):
            return
        raise refuse(f"the function {name}()",
                     "use the supported aggregates (COUNT, SUM, AVG, VARIANCE, STDDEV, "
                     "MEDIAN, QUANTILE_CONT) and scalar functions (date parts, arithmetic, "
                     "CASE, COALESCE, ABS, LEAST, GREATEST)")
    if isinstance(node, exp.Table):
        if not isinstance(node.this, exp.Identifier):
            raise refuse("table functions and file reads in FROM "
                         f"({node.this.sql(dialect=DIALECT)[:40]})",
                         "select from a permitted table by name")
        if node.this.quoted and ("." in node.name or "/" in node.name or "'" in node.name):
            raise refuse("a quoted file path in FROM", "select from a permitted table by name")
        if node.args.get("catalog"):
            raise refuse("a catalog-qualified table name", "use table or dataset.table")
        for key in ("joins", "pivots", "laterals", "hints", "version", "sample", "when",
                    "changes", "format", "pattern", "ordinality", "partition", "rows_from"):
            if node.args.get(key):
                raise refuse(f"the table clause {key.upper()}")
        return
    if isinstance(node, exp.Join):
        _check_join(node)
        return
    if isinstance(node, exp.Star) and not isinstance(node.parent, exp.Count):
        raise refuse("SELECT * (row-level output)", "select aggregates and group keys")
    if isinstance(node, exp.Cast):
        to = node.args.get("to")
        if not (isinstance(node.this, exp.Literal) and node.this.is_string and isinstance(
                to, exp.DataType) and to.this in CAST_LITERAL_TYPES):
            raise refuse("CAST (other than DATE '...' / TIMESTAMP '...' literals)",
                         "compare columns with typed literals such as DATE '2020-01-01'")
        return
    if isinstance(node, exp.Extract):
        part = node.this.name.lower() if isinstance(node.this, exp.Var | exp.Identifier |
                                                    exp.Literal) else ""
        if part not in DATE_PARTS:
            raise refuse(f"EXTRACT of {part or 'this part'}",
                         "extract year, quarter, month, day, dayofweek or dayofyear")
        return
    if isinstance(node, exp.In) and (node.args.get("query") or node.args.get("unnest")
                                     or node.args.get("field")):
        raise refuse("IN with a subquery", "list literal values: x IN (1, 2, 3)")
    if isinstance(node, exp.Like | exp.ILike) and node.args.get("escape"):
        raise refuse("LIKE ... ESCAPE")
    if isinstance(node, exp.Count | exp.Sum | exp.Avg) and node.args.get("filter"):
        raise refuse("aggregate FILTER clauses", "use CASE WHEN inside the aggregate")
    if isinstance(node, AGGREGATES + SCALAR_NODES + STRUCTURE_NODES):
        if isinstance(node, exp.Literal) and not node.is_string:
            try:
                value = float(node.this)
            except ValueError as err:
                raise refuse("a numeric literal DuckDB would read differently") from err
            if not math.isfinite(value):
                raise refuse("a non-finite numeric literal")
        return
    if isinstance(node, exp.Func):
        raise refuse(f"the function {node.sql_name().lower()}()",
                     "use the supported aggregates (COUNT, SUM, AVG, VARIANCE, STDDEV, "
                     "MEDIAN, QUANTILE_CONT) and scalar functions (date parts, arithmetic, "
                     "CASE, COALESCE, ABS, LEAST, GREATEST)")
    raise refuse(f"the construct {type(node).__name__}")


def _date_part_ok(node: exp.Anonymous) -> bool:
    args = node.expressions
    return (len(args) == 2 and isinstance(args[0], exp.Literal) and args[0].is_string
            and args[0].this.lower() in DATE_PARTS)


def _check_join(join: exp.Join) -> None:
    side = (join.args.get("side") or "").upper()
    kind = (join.args.get("kind") or "").upper()
    if side or kind not in ("", "INNER"):
        raise refuse(f"{(side + ' ' + kind).strip()} JOIN",
                     "use an inner JOIN ... ON a.person_id = b.person_id")
    if join.args.get("using"):
        raise refuse("JOIN ... USING", "write JOIN ... ON a.person_id = b.person_id")
    if join.args.get("method") or join.args.get("global") or join.args.get("match_condition"):
        raise refuse("this JOIN variant", "use an inner JOIN ... ON a.person_id = b.person_id")
    on = join.args.get("on")
    if on is None:
        raise refuse("a join without ON (cross join)",
                     "use an inner JOIN ... ON a.person_id = b.person_id")
    for part in on.flatten() if isinstance(on, exp.And) else [on]:
        if not (isinstance(part, exp.EQ) and isinstance(part.this, exp.Column)
                and isinstance(part.expression, exp.Column)):
            raise refuse("a non-equi join condition",
                         "join with ON a.person_id = b.person_id (or on a reference key)")
