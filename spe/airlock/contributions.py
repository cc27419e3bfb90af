"""Engine evidence for a table: its query re-run on the data side, per-cell contributions.

Contract
--------
A researcher whose permit gives row-level access (``access_mode`` ``pseudonymised``) builds
tables in the workspace. When creating the export request they may attach, for a table file,
the SQL that produced it, as an entry of the request's ``receipts`` list::

    {"evidence": "query", "file": "<file name in the request>", "sql": "SELECT ...",
     "dataset": "<optional; the permit's only dataset by default>"}

The airlock (data side, never the workspace) then:

1. parses the SQL with the DP engine's allow-list (:func:`spe.dp.parse.parse`) and accepts
   one per-person table (``person`` or ``linked``) of the permit, no joins, columns the permit
   grants only, plain ``GROUP BY`` keys, and the aggregates ``COUNT(*)``,
   ``COUNT(DISTINCT <person column>)`` and ``SUM(<expression>)``. Anything else is not
   recomputed: the table keeps threshold checks and human review;
2. re-runs the query's grouping on a read-only, locked-down DuckDB connection of the dataset
   (:func:`spe.dp.duck.connect`, memory/thread limits, ``query_timeout_seconds``) from SQL
   it generates itself (the researcher's text is parsed, checked and re-rendered by sqlglot,
   never sent as typed), computing per cell: persons, rows, and per ``SUM`` the total and the
   two largest per-person contributions (absolute values, as ACRO);
3. compares the submitted table with the recomputation: every present cell (a row per group
   key; a suppressed cell may be missing or empty) must equal it (counts exactly, sums within
   1e-6 relative). A table that does not is a blocking failure, "table does not match its
   query";
4. applies ACRO's rules per cell (``spe.airlock.sdc``): threshold on the persons behind each
   shown cell (ACRO's 10 or the permit's higher ``min_cell_count``), dominance N-K (n=2,
   k=90 % or the permit's lower ``dominance_k``) and p-percent (p=10 % or the permit's higher
   ``p_percent``) on every ``SUM`` cell. The ACRO definitions (``acro`` package, SACRO project,
   ``acro_tables``: ``safe_threshold``, ``safe_dom_n``, ``safe_dom_k``, ``safe_p_percent``):
   a cell is disclosive by dominance when the ``n`` largest contributions exceed ``k`` of the
   cell total, and by p-percent when total minus the two largest is less than ``p`` times the
   largest.

The workspace extract (``workspaces.extracts``) holds the same permitted tables and columns
with ``person_id`` replaced by a per-permit pseudonym, so counts, distinct persons and sums
recompute identically on the store. Person identifiers differ between the two (real ids
against pseudonyms), so the person column is accepted only inside ``COUNT(DISTINCT ...)``:
a key, filter or sum on it is not recomputed (reviewers decide), or the match verdict would
tell the researcher something about the real ids. Only pseudonymised permits get this: their
researchers already see the rows, so a match or a rule's verdict tells them nothing new,
whereas on a DP-only permit the comparison would be an exact-value oracle.

The researcher sees, per rule, pass/fail/needs review and how many cells fail, never a
recomputed number. Reviewers see the per-cell verdicts (``details["cells"]``: group key and
the rules it fails, no contributions either: the figures stay on the data side).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from sqlglot import exp

from permits.terms import AccessMode, PermitTerms
from spe.airlock import sdc
from spe.airlock.checks import FAIL, PASS, REVIEW, Check, FileVerdict, read_arrow
from spe.config import Settings
from spe.datasets.metadata import DatasetMetadata
from spe.db import Database
from spe.dp import duck
from spe.dp.parse import DIALECT
from spe.dp.parse import parse as parse_sql
from spe.dp.sqltext import quote_ident
from spe.errors import QueryRefused

#: Most cells recomputed per table (a larger grouping is left to reviewers).
MAX_CELLS = 10_000
#: Per-cell verdicts kept for reviewers.
MAX_SHOWN = 200

Opener = Callable[[str], tuple[DatasetMetadata, Path]]


class NotRecomputable(Exception):
    """The query is outside what the airlock recomputes; the message says why (no input)."""


@dataclass(frozen=True)
class Aggregate:
    output: str  # column name in the submitted table
    kind: str  # "rows", "persons" or "sum"
    sql: str = ""  # the summed expression (rendered by sqlglot), for "sum"


@dataclass(frozen=True)
class Recompute:
    """The query reduced to what the airlock re-runs."""

    table: str
    unit: str
    keys: tuple[tuple[str, str], ...]  # (output name, rendered expression)
    where: str | None
    aggregates: tuple[Aggregate, ...]


@dataclass
class Cell:
    persons: int
    rows: int
    #: per SUM output: (total, sum of absolute per-person contributions, top-1, top-2)
    sums: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    threshold: int = sdc.THRESHOLD
    dominance_k: float = sdc.DOMINANCE_K
    p_ratio: float = sdc.P_RATIO


def query_evidence(receipts: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """{file name: evidence entry} from a request's ``receipts`` list (last one wins)."""
    out: dict[str, Mapping[str, Any]] = {}
    for entry in receipts:
        if (isinstance(entry, Mapping) and entry.get("evidence") == "query"
                and isinstance(entry.get("file"), str) and isinstance(entry.get("sql"), str)):
            out[entry["file"]] = entry
    return out


# -- compiling ----------------------------------------------------------------------------

def _render(node: exp.Expression, alias: str, allowed: frozenset[str]) -> str:
    """``node`` as DuckDB SQL over table alias ``t``, every column checked against the
    permit's grant."""
    node = node.copy()
    for col in list(node.find_all(exp.Column)):
        if col.table and col.table != alias:
            raise NotRecomputable("a column of another table (joins are not recomputed)")
        if col.name not in allowed:
            raise NotRecomputable(f"the column {col.name!r}, which is a person identifier "
                                  "or not granted by the permit on this table")
        col.replace(exp.column(col.name, table="t", quoted=True))
    return node.sql(dialect=DIALECT)


def compile_query(sql: str, meta: DatasetMetadata, terms: PermitTerms) -> Recompute:
    """Reduce ``sql`` to a :class:`Recompute` or raise NotRecomputable / QueryRefused."""
    select = parse_sql(sql)
    if select.args.get("with_") or select.args.get("with"):
        raise NotRecomputable("a WITH table (per-person derived tables are not recomputed)")
    if select.args.get("joins"):
        raise NotRecomputable("a join (only single-table queries are recomputed)")
    for key in ("having", "order", "limit", "offset"):
        if select.args.get(key):
            raise NotRecomputable(f"the clause {key.upper()}")
    from_ = select.args.get("from_") or select.args.get("from")
    table_node = from_.this if from_ is not None else None
    if not isinstance(table_node, exp.Table):
        raise NotRecomputable("a FROM that is not one table")
    db = table_node.args.get("db")
    if db is not None and db.name != meta.name:
        raise NotRecomputable("a table of another dataset")
    name = table_node.name
    allowed = terms.allowed_columns(meta.name, name)
    tmeta = meta.tables.get(name)
    if tmeta is None or not allowed:
        raise NotRecomputable(f"the table {name!r}, unknown or not granted by the permit")
    if not tmeta.person_level or tmeta.privacy_unit is None:
        raise NotRecomputable(f"the table {name!r}, which is not a per-person table")
    unit = tmeta.privacy_unit
    alias = table_node.alias_or_name
    # Person identifiers are read only inside COUNT(DISTINCT ...): the store holds real ids
    # where the extract holds pseudonyms, so a key, filter or sum on them would make the
    # match verdict an oracle on the pseudonymisation (e.g. "WHERE person_id < x").
    cols = allowed - {unit, "person_id"}
    groups = list(select.args["group"].expressions) if select.args.get("group") else []
    group_sql = {g.sql(dialect=DIALECT) for g in groups}
    keys: list[tuple[str, str]] = []
    aggs: list[Aggregate] = []
    for item in select.expressions:
        inner = item.this if isinstance(item, exp.Alias) else item
        output = item.alias_or_name
        if isinstance(inner, exp.Count):
            arg = inner.this
            if isinstance(arg, exp.Star):
                aggs.append(Aggregate(output, "rows"))
            elif (isinstance(arg, exp.Distinct) and len(arg.expressions) == 1
                  and isinstance(arg.expressions[0], exp.Column)
                  and arg.expressions[0].name in (unit, "person_id")):
                aggs.append(Aggregate(output, "persons"))
            else:
                raise NotRecomputable("a COUNT other than COUNT(*) or COUNT(DISTINCT "
                                      "person_id)")
        elif isinstance(inner, exp.Sum):
            aggs.append(Aggregate(output, "sum", _render(inner.this, alias, cols)))
        elif any(isinstance(n, exp.AggFunc) for n in inner.walk()):
            raise NotRecomputable("an aggregate other than COUNT and SUM")
        elif inner.sql(dialect=DIALECT) in group_sql:
            keys.append((output, _render(inner, alias, cols)))
        else:
            raise NotRecomputable("a selected expression that is neither a GROUP BY key nor "
                                  "an aggregate")
    if len(keys) != len(groups):
        raise NotRecomputable("a GROUP BY key that is not selected")
    if not aggs:
        raise NotRecomputable("a query without COUNT or SUM")
    where = select.args.get("where")
    return Recompute(table=name, unit=unit, keys=tuple(keys),
                     where=_render(where.this, alias, cols) if where is not None else None,
                     aggregates=tuple(aggs))


def recompute_sql(plan: Recompute, agg: Aggregate | None) -> str:
    """Per cell: keys, persons, rows and, for ``agg`` (a SUM), total, top-1 and top-2
    absolute per-person contributions."""
    keys = [f"{expr} AS k{i}" for i, (_out, expr) in enumerate(plan.keys)]
    k = [f"k{i}" for i in range(len(plan.keys))]
    value = f"CAST(COALESCE({agg.sql}, 0) AS DOUBLE)" if agg is not None else "0.0"
    where = f" WHERE {plan.where}" if plan.where else ""
    by = ", ".join(k)
    base = ", ".join([*keys, f"t.{quote_ident(plan.unit)} AS pid", f"{value} AS v"])
    per_keys = ", ".join([*k, "pid"])
    partition = f"PARTITION BY {by} " if k else ""
    group = f" GROUP BY {by}" if k else ""
    figures = ", ".join([*k, "COUNT(*)", "SUM(r)", "SUM(c)", "SUM(abs(c))"])
    return (
        f"WITH base AS (SELECT {base} FROM {quote_ident(plan.table)} AS t{where}), "
        f"per AS (SELECT {per_keys}, SUM(v) AS c, COUNT(*) AS r FROM base "
        f"GROUP BY {per_keys}), "
        f"ranked AS (SELECT *, row_number() OVER ({partition}ORDER BY abs(c) DESC, pid) "
        f"AS rn FROM per) "
        f"SELECT {figures}, MAX(CASE WHEN rn = 1 THEN abs(c) END), "
        f"MAX(CASE WHEN rn = 2 THEN abs(c) END) FROM ranked{group} LIMIT {MAX_CELLS + 1}")


def _key(values: Sequence[Any]) -> tuple[str, ...]:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append("")
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v))
    return tuple(out)


def run(plan: Recompute, con: duckdb.DuckDBPyConnection, timeout: float
        ) -> dict[tuple[str, ...], Cell]:
    """The recomputed cells of ``plan``; raises NotRecomputable past :data:`MAX_CELLS`."""
    cells: dict[tuple[str, ...], Cell] = {}
    n = len(plan.keys)
    sums = [a for a in plan.aggregates if a.kind == "sum"]
    passes: list[Aggregate | None] = list(sums) or [None]
    for agg in passes:
        rows = duck.run(con, recompute_sql(plan, agg), timeout)
        if len(rows) > MAX_CELLS:
            raise NotRecomputable(f"more than {MAX_CELLS} cells")
        for row in rows:
            key = _key(row[:n])
            persons, nrows, total, magnitude, top1, top2 = row[n:]
            cell = cells.setdefault(key, Cell(int(persons), int(nrows)))
            if agg is not None:
                cell.sums[agg.output] = (float(total or 0.0), float(magnitude or 0.0),
                                         float(top1 or 0.0), float(top2 or 0.0))
    return cells


# -- comparing and judging ----------------------------------------------------------------

def _number(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _cell_rules(cell: Cell, shown: Mapping[str, float], plan: Recompute, limits: Limits
                ) -> list[str]:
    fails = []
    if shown and 0 < cell.persons < limits.threshold:
        fails.append("threshold")
    for agg in plan.aggregates:
        if agg.kind != "sum" or agg.output not in shown:
            continue
        _total, magnitude, top1, top2 = cell.sums.get(agg.output, (0.0, 0.0, 0.0, 0.0))
        # sdc.dominated and sdc.p_ratio_fails, on the figures the data side keeps: the rules
        # need only the two largest absolute per-person contributions and their sum over the
        # cell (ACRO works on absolute values too). n is 2 (ACRO's default, the most the
        # recomputation keeps).
        if magnitude > 0 and top1 + top2 > limits.dominance_k * magnitude:
            fails.append(f"dominance:{agg.output}")
        if top1 > 0 and magnitude - top1 - top2 < limits.p_ratio * top1:
            fails.append(f"p_percent:{agg.output}")
    return fails


def judge(table: pa.Table, plan: Recompute, cells: Mapping[tuple[str, ...], Cell],
          limits: Limits) -> list[Check]:
    """Compare ``table`` with the recomputed ``cells`` and apply the rules per cell."""
    names = set(table.column_names)
    needed = [o for o, _ in plan.keys] + [a.output for a in plan.aggregates]
    missing = [c for c in needed if c not in names]
    if missing:
        return [Check("query_match", FAIL, "The table does not match its query: it lacks the "
                      f"query's output columns {', '.join(missing[:10])}.", blocking=True)]
    mismatched = 0
    verdicts: list[dict[str, Any]] = []
    counts = {"threshold": 0, "dominance": 0, "p_percent": 0}
    rows = table.select(needed).to_pylist()
    seen: set[tuple[str, ...]] = set()
    for row in rows:
        key = _key([row[o] for o, _ in plan.keys])
        cell = cells.get(key)
        if cell is None or key in seen:
            mismatched += 1
            continue
        seen.add(key)
        shown: dict[str, float] = {}
        for agg in plan.aggregates:
            value = _number(row[agg.output])
            if value is None:
                continue  # suppressed by the researcher
            shown[agg.output] = value
            if agg.kind == "sum":
                expect = cell.sums.get(agg.output, (0.0, 0.0, 0.0, 0.0))[0]
                if abs(value - expect) > 1e-6 * max(1.0, abs(expect)):
                    mismatched += 1
            elif value != (cell.persons if agg.kind == "persons" else cell.rows):
                mismatched += 1
        fails = _cell_rules(cell, shown, plan, limits)
        for rule in fails:
            counts[rule.split(":")[0]] += 1
        if len(verdicts) < MAX_SHOWN:
            verdicts.append({"key": list(key), "fails": fails})
    if mismatched:
        return [Check("query_match", FAIL, f"The table does not match its query: {mismatched} "
                      "cells differ from the airlock's recomputation over the permit's data "
                      "(or name groups the query does not produce). Export the query's output "
                      "unchanged (suppressing cells is fine) and attach the exact SQL.",
                      blocking=True)]
    out = [Check("query_match", PASS, f"Every cell matches the airlock's recomputation of the "
                 f"attached query ({len(rows)} rows).", details={"cells": verdicts})]
    sums = [a.output for a in plan.aggregates if a.kind == "sum"]
    rules = (("threshold", f"cells rest on fewer than {limits.threshold} persons",
              "suppress them or merge groups"),
             ("dominance", f"sum cells are dominated: the {sdc.DOMINANCE_N} largest "
              f"persons hold more than {limits.dominance_k:.0%} of the total",
              "suppress them, merge groups or report counts instead"),
             ("p_percent", f"sum cells fail the p-percent rule (p={limits.p_ratio:.0%}): the "
              "second largest contributor could estimate the largest too closely",
              "suppress them or merge groups"))
    for name, what, fix in rules:
        if name != "threshold" and not sums:
            continue
        if counts[name]:
            out.append(Check(name if name != "threshold" else "persons_threshold", FAIL,
                             f"{counts[name]} {what}: {fix}.", details={"cells": verdicts}))
        else:
            out.append(Check(name if name != "threshold" else "persons_threshold", PASS,
                             f"No cell fails the {name.replace('_', '-')} rule on the "
                             "recomputed contributions."))
    return out


def check_table(table: pa.Table, evidence: Mapping[str, Any], terms: PermitTerms,
                opener: Opener, settings: Settings, limits: Limits) -> list[Check]:
    """The engine-evidence checks of one submitted table (see the module docstring)."""
    if terms.access_mode is not AccessMode.PSEUDONYMISED:
        return [Check("query_evidence", REVIEW, "This permit is DP-only: tables built from "
                      "row-level data cannot come from it, so the attached query is not "
                      "recomputed; reviewers decide.")]
    granted = [g.dataset for g in terms.datasets]
    dataset = evidence.get("dataset") or (granted[0] if len(granted) == 1 else None)
    if not isinstance(dataset, str) or dataset not in granted:
        return [Check("query_evidence", REVIEW, "The attached query does not name one of the "
                      "permit's datasets (name it with \"dataset\"); reviewers decide.")]
    try:
        meta, path = opener(dataset)
        plan = compile_query(str(evidence["sql"]), meta, terms)
        con = duck.connect(path, settings)
        try:
            cells = run(plan, con, settings.query_timeout_seconds)
        finally:
            con.close()
    except (NotRecomputable, QueryRefused) as err:
        why = err.detail if isinstance(err, QueryRefused) else str(err)
        return [Check("query_evidence", REVIEW, f"The attached query cannot be recomputed "
                      f"({why}); dominance and p-percent are left to reviewers.")]
    except (duck.QueryTimeout, duckdb.Error):
        return [Check("query_evidence", REVIEW, "Recomputing the attached query failed or ran "
                      "past the time limit; reviewers decide.")]
    return judge(table, plan, cells, limits)


def apply(verdict: FileVerdict, extra: Sequence[Check]) -> FileVerdict:
    """``verdict`` with the engine-evidence checks: they replace the placeholder saying
    dominance needs the engine's figures; a blocking failure fails the file; the file never
    passes on them (reviewers still decide)."""
    if not extra:
        return verdict
    recomputed = any(c.name == "query_match" for c in extra)
    kept = tuple(c for c in verdict.checks if not (recomputed and c.name == "dominance"
                                                  and c.outcome == REVIEW))
    checks = kept + tuple(extra)
    blocked = any(c.outcome == FAIL and c.blocking for c in checks)
    return FileVerdict(verdict.kind, FAIL if blocked else verdict.outcome, checks)


def file_checks(data: bytes, kind: str, path: Path | None, evidence: Mapping[str, Any],
                terms: PermitTerms, db: Database, settings: Settings) -> list[Check]:
    """:func:`check_table` for a CSV, TSV or Parquet file (a workbook's sheets are not
    recomputed: reviewers decide)."""
    if kind not in ("csv", "tsv", "parquet"):
        return [Check("query_evidence", REVIEW, f"A query attached to a {kind} file is not "
                      "recomputed (only CSV, TSV and Parquet tables are); reviewers decide.")]
    from spe.datasets.registry import open_dataset

    def opener(name: str) -> tuple[DatasetMetadata, Path]:
        return open_dataset(db, settings, name)

    table = read_arrow(data, kind, path)
    policy = terms.export
    limits = Limits(threshold=max(sdc.THRESHOLD, policy.min_cell_count),
                    dominance_k=min(sdc.DOMINANCE_K, policy.dominance_k),
                    p_ratio=max(sdc.P_RATIO, policy.p_percent))
    return check_table(table, evidence, terms, opener, settings, limits)
