"""Automated checks of one export file against its permit.

Contract
--------
:func:`check_file` takes a file's bytes and a :class:`Context` (the permit's export policy and
limits, the DP receipts the researcher attached, the permit's earlier releases) and returns a
:class:`FileVerdict`: the kind decided from content and every check as a :class:`Check` with
``outcome`` ``pass``, ``fail`` or ``needs_review`` and a reason the researcher can act on.
Reasons name columns and counts, never cell values.

* ``blocking`` failures (refused kind, a kind the permit does not allow, too many rows,
  encoded files in cells) return the request to the researcher; other failures go to the
  reviewers, who can override them only with a written reason.
* The file's own verdict is ``pass`` only when a valid DP release receipt signed for this
  permit covers its exact bytes (then nothing else can make it safer); otherwise
  ``needs_review`` at best: a table without the engine's evidence is never released on
  threshold checks alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spe.airlock import kinds, sdc, xlsx
from spe.dp import receipt as receipts

Outcome = Literal["pass", "fail", "needs_review"]
PASS: Outcome = "pass"  # noqa: S105 - an outcome, no secret
FAIL: Outcome = "fail"
REVIEW: Outcome = "needs_review"


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    reason: str
    blocking: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReleasedTable:
    """A table the permit already released (for differencing)."""

    request_id: str
    name: str
    table: pd.DataFrame


@dataclass(frozen=True)
class Context:
    permit_id: str
    secret: str
    allowed_kinds: frozenset[str]
    min_cell_count: int = sdc.THRESHOLD
    max_rows: int = 5000
    receipts: Sequence[Mapping[str, Any]] = ()
    released_hashes: frozenset[str] = frozenset()
    released_tables: Sequence[ReleasedTable] = ()


@dataclass(frozen=True)
class FileVerdict:
    kind: str
    outcome: Outcome
    checks: tuple[Check, ...]

    @property
    def blocked(self) -> bool:
        return any(c.outcome == FAIL and c.blocking for c in self.checks)


# Permit kinds (permits.schemas.FileKind) that each sniffed kind satisfies.
_PERMIT_KIND = {"csv": "csv", "tsv": "tsv", "parquet": "parquet", "json": "json",
                "txt": "txt", "md": "txt", "png": "png", "jpeg": "jpeg", "svg": "svg",
                "pdf": "pdf", "xlsx": "xlsx"}

_ID_NAME = re.compile(
    r"^(?:(?:person|patient|subject|participant|visit_occurrence|visit|provider|care_site)"
    r"_?(?:id|source_value|number|no)|ssn|mrn|nhs_?number|hetu|henkilotunnus|pseudonym|"
    r"pseudo_?id|social_security_number|personal_?(?:id|number|code))$")
_BIRTH_NAME = re.compile(r"(?:birth_?(?:date|datetime|day)|date_?of_?birth|^dob$|^birthday$)")
_PERSONAL_NAME = re.compile(r"^(?:first_?name|last_?name|surname|full_?name|given_?name|"
                            r"family_?name|email|e_?mail|phone|phone_?number|address|"
                            r"street_?address)$")
_COUNT_NAME = re.compile(r"^(?:n|count|counts|freq|frequency|num|number|total|cases|patients|"
                         r"persons|people|subjects|n_\w+|\w+_count|count_\w+|\w+_n|num_\w+|"
                         r"number_of_\w+)$")
_ID_VALUE = re.compile(r"^(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|"
                       r"[0-9a-f]{16,}|(?=.*\d)(?=.*[a-z])[a-z0-9_-]{8,40})$", re.I)
_FULL_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[ T][0-9:.]+)?$")
_B64 = r"^[A-Za-z0-9+/_-]{24,}={0,2}$"


def _norm(name: object) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: DuckDB's own memory bound while it parses a table or compares it with released ones (the
#: resulting Arrow table lives outside it: about 1.5x the CSV's size for bench/airlock's file).
DUCKDB_MEMORY_LIMIT = "1GB"


def _duckdb_csv(path: Path, kind: str) -> pa.Table:
    """Parse a CSV/TSV file with DuckDB: the first line is the header, every row must have
    its columns (no padding, no skipped lines), types inferred from a sample and, when a later
    value does not fit them, from the whole file."""
    delim = "\\t" if kind == "tsv" else ","
    literal = "'" + str(path).replace("'", "''") + "'"
    con = duckdb.connect(config={"threads": 4, "memory_limit": DUCKDB_MEMORY_LIMIT})
    try:
        for sample in ("", ", sample_size=-1"):
            try:
                return con.sql(f"SELECT * FROM read_csv({literal}, header=true, "
                               f"delim='{delim}', skip=0, strict_mode=true, "
                               f"null_padding=false, quote='\"'{sample})").to_arrow_table()
            except duckdb.ConversionException:
                continue  # a late value broke the sampled types: infer from every row
        raise ValueError("ConversionException")
    finally:
        con.close()


def read_arrow(data: bytes, kind: str, path: Path | None = None) -> pa.Table:
    """The table in ``data`` (CSV, TSV or Parquet) as Arrow; raises ValueError when it does not
    parse. CSV and TSV are parsed by DuckDB from ``path`` (the same bytes on disk, as in
    quarantine) or, without one, from a private temporary copy, so every table is typed
    the same way (differencing compares cells by their text)."""
    try:
        if kind == "parquet":
            return pq.read_table(io.BytesIO(data))
        if path is not None:
            return _duckdb_csv(path, kind)
        with tempfile.NamedTemporaryFile(prefix="spe-airlock-", suffix=".csv") as tmp:
            tmp.write(data)
            tmp.flush()
            return _duckdb_csv(Path(tmp.name), kind)
    except Exception as err:  # noqa: BLE001 - any parser error means "not a table"
        raise ValueError(type(err).__name__) from None


def read_table(data: bytes, kind: str, path: Path | None = None) -> pd.DataFrame:
    """:func:`read_arrow` as a pandas DataFrame."""
    return read_arrow(data, kind, path).to_pandas()


def _is_text(column: pa.ChunkedArray) -> bool:
    t = column.type
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t)
                or pa.types.is_string_view(t))


def _is_number(column: pa.ChunkedArray) -> bool:
    t = column.type
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


# Individual checks --------------------------------------------------------------------------

def check_kind(sniffed: kinds.Sniffed, ctx: Context) -> list[Check]:
    if sniffed.refused:
        return [Check("file_kind", FAIL, f"Refused: the content is {sniffed.refused}. The "
                      "file kind is decided from the bytes, not the name.", blocking=True,
                      details={"kind": sniffed.kind})]
    permit_kind = _PERMIT_KIND.get(sniffed.kind)
    if permit_kind is not None and permit_kind not in ctx.allowed_kinds:
        allowed = ", ".join(sorted(ctx.allowed_kinds))
        return [Check("file_kind", FAIL, f"The content is {sniffed.kind}, which this permit "
                      f"does not allow to leave (allowed: {allowed}).", blocking=True,
                      details={"kind": sniffed.kind})]
    if permit_kind is None:
        return [Check("file_kind", REVIEW, f"The content is {sniffed.kind}: not a kind the "
                      "airlock can check, so reviewers decide.", details={"kind": sniffed.kind})]
    return [Check("file_kind", PASS, f"The content is {sniffed.kind}.",
                  details={"kind": sniffed.kind})]


def check_receipt(data: bytes, digest: str, ctx: Context) -> Check | None:
    """The DP receipt covering this file, if any (None when no receipt names its hash)."""
    claimed = [r for r in ctx.receipts
               if isinstance(r, Mapping) and digest in (r.get("sha256_csv"),
                                                        r.get("sha256_parquet"))]
    if not claimed:
        return None
    for r in claimed:
        receipt = dict(r)
        if not receipts.verify(receipt, ctx.secret, data):
            continue
        if receipt.get("permit_id") != ctx.permit_id:
            return Check("dp_receipt", FAIL, "The release receipt covering this file was signed "
                         "for another permit; export it under that permit.")
        shown = {k: receipt.get(k) for k in ("charge_id", "dataset", "epsilon", "delta",
                                              "issued_at", "rows", "columns")}
        return Check("dp_receipt", PASS, "A DP release receipt signed by the query engine for "
                     "this permit covers these exact bytes.", details=shown)
    return Check("dp_receipt", FAIL, "A receipt names this file's hash but its signature does "
                 "not verify: attach the receipt exactly as the query API returned it.")


def check_already_released(digest: str, ctx: Context) -> Check | None:
    if digest in ctx.released_hashes:
        return Check("already_released", PASS, "These exact bytes were already released under "
                     "this permit.")
    return None


def check_identifiers(table: pa.Table) -> list[Check]:
    """Columns named like identifiers; text columns of (nearly) distinct values that look like
    ids or exact dates (a sample of 1,000 decides the look, then the whole column's distinct
    count); date columns of distinct values."""
    named: list[str] = []
    valued: list[str] = []
    dates: list[str] = []
    for column in table.column_names:
        norm = _norm(column)
        if _ID_NAME.match(norm) or _BIRTH_NAME.search(norm) or _PERSONAL_NAME.match(norm):
            named.append(str(column))
            continue
        values = table.column(column)
        present = len(values) - values.null_count
        if present < 20:
            continue
        temporal = pa.types.is_date(values.type) or pa.types.is_timestamp(values.type)
        if temporal:
            looks = "date"
        elif _is_text(values):
            sample: list[str] = values.drop_null().slice(0, 1000).to_pylist()
            if sum(bool(_ID_VALUE.fullmatch(v)) for v in sample) >= 0.9 * len(sample):
                looks = "id"
            elif sum(bool(_FULL_DATE.fullmatch(v)) for v in sample) >= 0.9 * len(sample):
                looks = "date"
            else:
                continue
        else:
            continue
        if pc.count_distinct(values, mode="only_valid").as_py() < 0.95 * present:
            continue
        (valued if looks == "id" else dates).append(str(column))
    out: list[Check] = []
    if named or valued:
        cols = ", ".join((named + valued)[:10])
        out.append(Check("identifiers", FAIL, f"Columns that identify persons (by name or by "
                         f"values): {cols}. Remove them and export aggregates only.",
                         details={"columns": (named + valued)[:50]}))
    if dates:
        out.append(Check("row_level_dates", REVIEW, "Columns of distinct exact dates (row-level "
                         f"data?): {', '.join(dates[:10])}. Aggregate or coarsen them to months "
                         "or years.", details={"columns": dates[:50]}))
    if not out:
        out.append(Check("identifiers", PASS, "No column looks like a person identifier, a "
                         "date of birth or a personal detail."))
    return out


def check_encoded(table: pa.Table) -> Check:
    """Cells carrying long base64 text: a file smuggled inside a table (vectorised: lengths
    first, the pattern only on long cells, decoding only of the first 200 hits)."""
    suspicious = 0
    for column in table.column_names:
        values = table.column(column)
        if not _is_text(values):
            continue
        lengths = pc.binary_length(values)  # base64 is ASCII: bytes = characters
        if (pc.max(lengths).as_py() or 0) < 24:
            continue
        long = values.filter(pc.greater_equal(lengths, 24))
        hits = long.filter(pc.match_substring_regex(long, _B64))
        if not len(hits):
            continue
        suspicious += len(hits)
        for text in hits.slice(0, 200).to_pylist():
            try:
                raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_"
                                       if ("-" in text or "_" in text) else None)
            except (binascii.Error, ValueError):
                continue
            bad = kinds.dangerous(raw)
            if bad is not None:
                return Check("encoded_content", FAIL, f"Column {column} carries an encoded "
                             f"file ({bad}) in its cells. Files leave only as files.",
                             blocking=True, details={"column": str(column)})
    if suspicious:
        return Check("encoded_content", REVIEW, f"{suspicious} cells hold long encoded text; "
                     "reviewers check what it is.", details={"cells": suspicious})
    return Check("encoded_content", PASS, "No cell carries encoded data.")


def count_columns(table: pa.Table | pd.DataFrame) -> list[str]:
    if isinstance(table, pd.DataFrame):
        return [str(c) for c in table.columns
                if _COUNT_NAME.match(_norm(c)) and table[c].dtype.kind in "iuf"]
    return [str(c) for c in table.column_names
            if _COUNT_NAME.match(_norm(c)) and _is_number(table.column(c))]


def key_columns(table: pa.Table | pd.DataFrame) -> list[str]:
    counts = set(count_columns(table))
    if isinstance(table, pd.DataFrame):
        return [str(c) for c in table.columns if str(c) not in counts
                and table[c].dtype.kind not in "f"]
    return [str(c) for c in table.column_names if str(c) not in counts
            and not pa.types.is_floating(table.column(c).type)]


def check_disclosure(table: pa.Table, ctx: Context) -> list[Check]:
    counts = count_columns(table)
    if not counts:
        return [Check("cell_counts", REVIEW, "No count column recognised (name one n, count or "
                      "ending in _count); reviewers check the cells by hand.")]
    small = zeros = 0
    for column in counts:
        values = pc.cast(table.column(column), pa.float64()).drop_null()
        # sdc.below_threshold / sdc.is_zero, vectorised
        small += pc.sum(pc.and_(pc.greater(values, 0),
                                pc.less(values, ctx.min_cell_count))).as_py() or 0
        zeros += pc.sum(pc.equal(values, 0)).as_py() or 0
    out = []
    if small:
        out.append(Check("cell_counts", FAIL, f"{small} cells count fewer than "
                         f"{ctx.min_cell_count} (the permit's minimum): suppress or merge "
                         "them, or round.", details={"cells": small,
                                                     "columns": counts}))
    else:
        out.append(Check("cell_counts", PASS, f"Every count is 0 or at least "
                         f"{ctx.min_cell_count}.", details={"columns": counts}))
    if zeros:
        out.append(Check("zeros", REVIEW, f"{zeros} cells are zero: reviewers check that none "
                         "reveals something about a group (structural zeros are fine).",
                         details={"cells": zeros}))
    out.append(Check("dominance", REVIEW, "Dominance (N-K 2/90%) and p-percent (10%) need "
                     "contributions per cell, which only the query engine has: reviewers "
                     "check magnitude tables."))
    return out


#: Flagged cells kept in a differencing check's details for reviewers (the count is exact).
FLAGGED_SHOWN = 50


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _compare_in_duckdb(con: duckdb.DuckDBPyConnection, keys: list[str], columns: list[str],
                       threshold: int) -> tuple[int, list[dict[str, Any]]]:
    """Cells (joined on the key columns as text, NULL matching NULL) and column totals of
    the registered views ``new_t`` and ``old_t`` that differ by 1 to ``threshold - 1``:
    (how many, the first :data:`FLAGGED_SHOWN` as {key, column, delta})."""
    parts = []
    for column in columns:
        c = _ident(column)
        cell = (f"SELECT {{key}} AS key, '{column.replace(chr(39), chr(39) * 2)}' AS col, "
                f"CAST(n.{c} AS DOUBLE) - CAST(o.{c} AS DOUBLE) AS delta "
                f"FROM new_t n JOIN old_t o ON {{on}}")
        key = ("list_value(" + ", ".join(f"CAST(n.{_ident(k)} AS VARCHAR)" for k in keys)
               + ")") if keys else "list_value('<row>')"
        on = " AND ".join(f"CAST(n.{_ident(k)} AS VARCHAR) IS NOT DISTINCT FROM "
                          f"CAST(o.{_ident(k)} AS VARCHAR)" for k in keys) or "false"
        parts.append(cell.format(key=key, on=on))
        parts.append(f"SELECT list_value('<total>') AS key, "
                     f"'{column.replace(chr(39), chr(39) * 2)}' AS col, "
                     f"(SELECT coalesce(sum(CAST({c} AS DOUBLE)), 0) FROM new_t) - "
                     f"(SELECT coalesce(sum(CAST({c} AS DOUBLE)), 0) FROM old_t) AS delta")
    query = (f"WITH d AS ({' UNION ALL '.join(parts)}) SELECT key, col, delta, "
             f"count(*) OVER () FROM d WHERE abs(delta) > 0 AND abs(delta) < {threshold} "
             f"ORDER BY col, key LIMIT {FLAGGED_SHOWN}")
    rows = con.execute(query).fetchall()
    found = [{"key": [None if k is None else str(k) for k in r[0]], "column": r[1],
              "delta": r[2]} for r in rows]
    return (int(rows[0][3]) if rows else 0), found


def check_differencing(arrow: pa.Table, ctx: Context) -> Check:
    """Compare ``arrow`` with each table this permit released before, in DuckDB (a hash join
    on the key columns; no per-row Python, no row bound): a cell or a column total that
    differs by 1 to ``min_cell_count - 1`` fails, naming the release. The details list the
    flagged cells (key values, column, difference) for reviewers."""
    counts = count_columns(arrow)
    if not counts:
        return Check("differencing", PASS if not ctx.released_tables else REVIEW,
                     "No count column to compare with earlier releases.")
    if not ctx.released_tables:
        return Check("differencing", PASS, "No earlier release of this permit to compare "
                     "with.")
    keys = key_columns(arrow)
    compared: list[dict[str, Any]] = []
    con = duckdb.connect(config={"threads": 2, "memory_limit": DUCKDB_MEMORY_LIMIT})
    try:
        con.register("new_t", arrow.select(keys + counts))
        for released in ctx.released_tables:
            old_counts = [c for c in count_columns(released.table) if c in counts]
            if not old_counts or key_columns(released.table) != keys:
                continue
            con.register("old_t", released.table[keys + old_counts])
            n, found = _compare_in_duckdb(con, keys, old_counts, ctx.min_cell_count)
            con.unregister("old_t")
            compared.append({"request_id": released.request_id, "name": released.name})
            if n:
                return Check("differencing", FAIL, f"{n} cells or totals differ by fewer "
                             f"than {ctx.min_cell_count} from {released.name}, released in "
                             f"request {released.request_id}: subtracting one from the other "
                             "reveals a small group.",
                             details={"request_id": released.request_id,
                                      "name": released.name, "cells": n, "flagged": found,
                                      "compared": compared})
    finally:
        con.close()
    return Check("differencing", PASS, "No cell or total differs by a small amount from an "
                 "earlier release of this permit.", details={"compared": compared})


def check_acro_evidence(data: bytes) -> Check | None:
    """An ACRO ``results.json`` (outputs each with a ``status``): the researcher's own
    disclosure checks, summarised for reviewers and never trusted for release."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict) or not results or not all(
            isinstance(v, dict) and isinstance(v.get("status"), str) for v in results.values()):
        return None
    counts: dict[str, int] = {}
    for output in results.values():
        status = str(output["status"])[:20]
        counts[status] = counts.get(status, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return Check("acro_evidence", REVIEW, f"ACRO results from the researcher's own checks: "
                 f"{len(results)} outputs ({summary}). Shown to reviewers as evidence; the "
                 "airlock never releases on them.",
                 details={"outputs": len(results), "status": counts})


# The whole file ---------------------------------------------------------------------------

def read_tables(data: bytes, kind: str, path: Path | None = None) -> dict[str, pa.Table]:
    """The tables of a file: one (named "") for CSV, TSV and Parquet, one per sheet for XLSX;
    raises ValueError when it does not parse."""
    if kind == "xlsx":
        return xlsx.sheets(data)
    return {"": read_arrow(data, kind, path)}


def _check_table(table: pa.Table, ctx: Context, receipt: Check | None) -> list[Check]:
    out: list[Check] = []
    rows = table.num_rows
    if rows > ctx.max_rows:
        out.append(Check("rows", FAIL, f"{rows} rows, more than the {ctx.max_rows} "
                         "this permit allows: export aggregates, not row-level data.",
                         blocking=True, details={"rows": rows}))
    else:
        out.append(Check("rows", PASS, f"{rows} rows (limit {ctx.max_rows}).",
                         details={"rows": rows}))
    out.append(check_encoded(table))
    if receipt is None or receipt.outcome != PASS:
        out.extend(check_identifiers(table))
        out.extend(check_disclosure(table, ctx))
        out.append(check_differencing(table, ctx))
    return out


def _in_sheet(sheet: str, found: list[Check]) -> list[Check]:
    """A workbook sheet's checks name the sheet (a plain table's are unchanged)."""
    if not sheet:
        return found
    return [Check(c.name, c.outcome, f"Sheet {sheet[:31]}: {c.reason}", c.blocking,
                  {**c.details, "sheet": sheet[:31]}) for c in found]


def check_file(data: bytes, ctx: Context, path: Path | None = None) -> FileVerdict:
    """Check ``data``; ``path``, when given, holds the same bytes on disk (the quarantine
    file) for the table parser to read directly."""
    digest = sha256(data)
    sniffed = kinds.sniff(data)
    results: list[Check] = check_kind(sniffed, ctx)
    if any(c.outcome == FAIL and c.blocking for c in results):
        return FileVerdict(sniffed.kind, FAIL, tuple(results))
    receipt = check_receipt(data, digest, ctx)
    if receipt is not None:
        results.append(receipt)
    seen = check_already_released(digest, ctx)
    if seen is not None:
        results.append(seen)
    if sniffed.kind in kinds.TABLE_KINDS:
        try:
            tables = read_tables(data, sniffed.kind, path)
        except ValueError:
            results.append(Check("table_parse", FAIL, f"The file looks like {sniffed.kind} but "
                                 "does not parse as a table with the same columns on every "
                                 "row.", blocking=True))
            return FileVerdict(sniffed.kind, FAIL, tuple(results))
        for sheet, table in tables.items():
            results.extend(_in_sheet(sheet, _check_table(table, ctx, receipt)))
    elif receipt is None or receipt.outcome != PASS:
        evidence = check_acro_evidence(data) if sniffed.kind == "json" else None
        if evidence is not None:
            results.append(evidence)
        results.append(Check("human_review", REVIEW, f"{sniffed.kind} files (images, documents, "
                             "free text, models) are checked by reviewers, never released "
                             "automatically."))
    if any(c.outcome == FAIL and c.blocking for c in results):
        return FileVerdict(sniffed.kind, FAIL, tuple(results))
    if receipt is not None and receipt.outcome == PASS:
        return FileVerdict(sniffed.kind, PASS, tuple(results))
    return FileVerdict(sniffed.kind, REVIEW, tuple(results))
