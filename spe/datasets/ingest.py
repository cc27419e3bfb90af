"""Ingest OMOP CDM 5.4 exports into one DuckDB file per dataset.

Contract of ``ingest(db, settings, name, source, principal)``:

* ``source`` is a directory of table files as data holders export them: ``person.csv`` or
  ``PERSON.csv`` (also ``.tsv``/``.txt``, each optionally gzipped as ``.csv.gz``; comma or
  tab separated, detected from the header; header names quoted or not) or ``person.parquet``.
  Other file kinds (e.g. the declaration ``spe-metadata.yaml``, READMEs) are ignored; a
  data file that is not a CDM table is an error.
* Column names are matched case-insensitively; unknown columns, duplicated columns and missing
  required columns are errors; missing optional columns are stored as NULL. Values get the
  spec's DuckDB types (a DATE written with a time, e.g. ``2020-01-31 00:00:00``, is accepted
  as its date). A bad value, a wrong number of fields, a truncated line, a NULL in a
  required column or a duplicated primary key (``person_id`` in ``person``) is an
  ``IngestError`` naming the file, line (for Parquet: row) and column — never the value.
* Every table gets its kind (per-person, linked, public, refused: ``spe.datasets.defaults``).
  A linked table's rows are resolved through its declared foreign-key path to their person,
  stored in the hidden ``LINKED_PERSON_COLUMN``; a row that reaches no person is an
  ``IngestError`` naming its line. Every per-person and linked table gets ``ROW_RANK_COLUMN``:
  a uniformly random rank of the row among the person's rows (1..n), computed once here; such
  tables (but ``person``, one row per person) are stored ordered by that rank, so the DP
  engine's truncation filter (rank <= k) reads only the row groups that can pass it.
* Dates and timestamps must lie in the years 1 to 9999 (CSV and Parquet alike).
* Atomic: the database is built in a temporary file in the store directory (mode 0700), moved to
  ``<name>.duckdb`` (mode 0600) and registered — ``DatasetRecord`` row plus a ``dataset.ingest``
  audit event — in one control-database transaction. Any failure leaves neither file nor row,
  and is itself audited (outcome ``failure``, with the reason) in a separate transaction.
* An existing dataset name is refused (``Conflict``); nothing is overwritten.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import logging
import os
import re
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from spe.audit import AuditEvent, Outcome, record
from spe.auth.principal import Principal
from spe.config import Settings
from spe.datasets import defaults, recovery
from spe.datasets.metadata import (
    LINKED_PERSON_COLUMN,
    PRIVACY_UNIT,
    ROW_RANK_COLUMN,
    DatasetMetadata,
    LinkHop,
    TableMeta,
)
from spe.datasets.models import DatasetRecord
from spe.datasets.omop_spec import CDM_VERSION, TableSpec, load_spec
from spe.db import Database
from spe.errors import Conflict, IngestError, SPEError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: Data file names: <table>.csv|.tsv|.txt (optionally .gz) or <table>.parquet, any case.
DATA_FILE = re.compile(r"^(?P<table>[A-Za-z_0-9]+)\.(?P<kind>csv|tsv|txt|parquet)"
                       r"(?P<gz>\.gz)?$", re.IGNORECASE)
_ANY_DATA = re.compile(r"\.(csv|tsv|txt|parquet)(\.gz)?$", re.IGNORECASE)
STORE_SUFFIX = ".duckdb"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_HEADER_LIMIT = 1 << 20
_REJECT_TEXT = {
    "CAST": "value does not match the column type",
    "MISSING COLUMNS": "too few fields (truncated or short line)",
    "TOO MANY COLUMNS": "too many fields",
    "UNQUOTED VALUE": "badly quoted value (unterminated or stray quote; truncated file?)",
    "LINE SIZE OVER MAXIMUM": "line too long",
    "INVALID UNICODE": "not valid UTF-8",
    "INVALID STATE": "malformed line",
}


@dataclass(frozen=True)
class SourceFile:
    """One table file found in the source directory."""

    table: str
    path: Path
    kind: str  # "csv", "tsv" or "parquet"
    delimiter: str | None
    columns: tuple[str, ...]  # lower-case, in file order
    compact_dates: bool = False  # DATE values written YYYYMMDD (the OHDSI vocabulary files)
    quoted: bool = True  # '"' quotes fields; off for tab-separated files with a bare header


@dataclass
class IngestResult:
    """What ``ingest`` registered, with wall seconds per table (load + checks + rank)."""

    name: str
    metadata: DatasetMetadata
    path: Path
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0

    @property
    def rows(self) -> dict[str, int]:
        return {t: m.row_count for t, m in self.metadata.tables.items()}


def store_path(settings: Settings, name: str) -> Path:
    return settings.store_dir / f"{name}{STORE_SUFFIX}"


def ensure_store(settings: Settings) -> Path:
    """Create the dataset store (mode 0700) and tighten its mode if it exists."""
    store = settings.store_dir
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(store, 0o700)
    return store


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise IngestError(
            "dataset names are 1-63 characters: a lower-case letter, then lower-case letters, "
            "digits, '_' or '-'")


# Discovery -------------------------------------------------------------------------------


def _describe(column: str, position: int) -> str:
    """A header entry safe to echo: identifiers by name, anything else by position only."""
    return repr(column) if _IDENT.match(column) else f"field {position} of the header"


def _read_header(path: Path) -> tuple[str, str]:
    """First line of a delimited file (without BOM/line end) and the detected delimiter."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.readline(_HEADER_LIMIT)
    except (OSError, EOFError):
        raise IngestError(f"{path.name}: cannot read the file (corrupt compression?)") from None
    if not raw.strip():
        raise IngestError(f"{path.name}: the file is empty (a header line is required)")
    if not raw.endswith(b"\n") and len(raw) >= _HEADER_LIMIT:
        raise IngestError(f"{path.name} line 1: header line too long")
    try:
        line = raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise IngestError(f"{path.name} line 1: header is not valid UTF-8") from None
    unquoted = re.sub(r'"[^"]*"', "", line)
    tabs, commas = unquoted.count("\t"), unquoted.count(",")
    if tabs or commas:
        delimiter = "\t" if tabs >= commas else ","
    else:
        delimiter = "\t" if ".tsv" in path.name.lower() else ","
    return line, delimiter


_COMPACT_DATE = re.compile(r"^\d{8}$")


def _compact_dates(path: Path, spec: TableSpec, columns: tuple[str, ...],
                   delimiter: str) -> bool:
    """Whether the file writes dates as YYYYMMDD (as the OHDSI vocabulary files do), judged
    from the DATE fields of its first data line; the whole file is then read in that format
    (a line in the other one is a rejected value, named by its line)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            fh.readline(_HEADER_LIMIT)
            first = fh.readline(_HEADER_LIMIT)
    except (OSError, EOFError, UnicodeDecodeError):
        return False  # reading the data reports the problem with its line
    fields = next(csv.reader([first.rstrip("\r\n")], delimiter=delimiter, quotechar='"',
                             quoting=csv.QUOTE_NONE if delimiter == "\t"
                             else csv.QUOTE_MINIMAL), [])
    dates = [f.strip() for f, c in zip(fields, columns, strict=False)
             if (fs := spec.field(c)) is not None and fs.duckdb_type == "DATE" and f.strip()]
    return bool(dates) and all(_COMPACT_DATE.match(d) for d in dates)


def _header_columns(path: Path, line: str, delimiter: str) -> tuple[str, ...]:
    fields = next(csv.reader([line], delimiter=delimiter, quotechar='"'))
    return tuple(f.strip().strip('"').strip().lower() for f in fields)


def _check_columns(path: Path, spec: TableSpec, columns: tuple[str, ...]) -> None:
    known = set(spec.column_names)
    matching = sum(1 for c in columns if c in known)
    if matching * 2 < len(columns):
        # Probably data, not a header: echo nothing from the line.
        raise IngestError(f"{path.name} line 1: not a header of OMOP CDM {CDM_VERSION} "
                          f"{spec.name} columns ({matching} of {len(columns)} fields are "
                          "column names; is the header missing?)")
    problems = []
    seen: set[str] = set()
    for position, column in enumerate(columns, start=1):
        if column in seen:
            problems.append(f"column {_describe(column, position)} appears twice")
        seen.add(column)
        if column not in known:
            problems.append(f"unknown column {_describe(column, position)} "
                            f"(not in OMOP CDM {CDM_VERSION} {spec.name})")
    missing = [c for c in spec.required_columns if c not in seen]
    if missing:
        problems.append("missing required column(s): " + ", ".join(missing))
    if problems:
        raise IngestError(f"{path.name} line 1 (header): " + "; ".join(problems))


def discover(source: Path) -> list[SourceFile]:
    """The table files in ``source``, checked against the spec (see module docstring)."""
    if not source.is_dir():
        raise IngestError(f"{source}: not a directory of OMOP table files")
    specs = load_spec()
    found: dict[str, SourceFile] = {}
    schema_reader: duckdb.DuckDBPyConnection | None = None  # one for every Parquet file
    try:
        for path in sorted(source.iterdir()):
            if not path.is_file() or path.name.startswith(".") or \
                    not _ANY_DATA.search(path.name):
                continue
            match = DATA_FILE.match(path.name)
            table = match.group("table").lower() if match else ""
            spec = specs.get(table)
            if match is None or spec is None or (match.group("gz") and
                                                  match.group("kind").lower() == "parquet"):
                raise IngestError(f"{path.name}: not an OMOP CDM {CDM_VERSION} table file "
                                  "(names must be table names, e.g. person.csv, PERSON.tsv, "
                                  "person.csv.gz or person.parquet)")
            if table in found:
                raise IngestError(f"{path.name} and {found[table].path.name} both hold table "
                                  f"{table}; keep one")
            if match.group("kind").lower() == "parquet":
                schema_reader = schema_reader or duckdb.connect()
                columns = tuple(n.strip().lower()
                                for n in _parquet_columns(schema_reader, path))
                sf = SourceFile(table, path, "parquet", None, columns)
            else:
                line, delimiter = _read_header(path)
                columns = _header_columns(path, line, delimiter)
                # Tab-separated files with a bare header (the OHDSI vocabulary downloads) do
                # not quote: a name such as '"Cold" remedy' is text, not a quoted field.
                quoted = delimiter != "\t" or '"' in line
                sf = SourceFile(table, path, "tsv" if delimiter == "\t" else "csv", delimiter,
                                columns, _compact_dates(path, spec, columns, delimiter), quoted)
            _check_columns(path, spec, sf.columns)
            found[table] = sf
    finally:
        if schema_reader is not None:
            schema_reader.close()
    if not found:
        raise IngestError(f"{source}: no OMOP table files (.csv, .tsv, .txt or .parquet)")
    if "person" not in found:
        raise IngestError(f"{source}: the person table is required (it defines the "
                          "privacy unit person_id)")
    return list(found.values())


def _parquet_columns(con: duckdb.DuckDBPyConnection, path: Path) -> list[str]:
    """The top-level column names of a Parquet file as its schema stores them (duplicates
    kept, so the header check can name them; DuckDB's DESCRIBE would rename them)."""
    try:
        rows = con.execute("SELECT name, num_children FROM parquet_schema(?)",
                           [str(path)]).fetchall()
    except duckdb.Error:
        raise IngestError(f"{path.name}: not a readable Parquet file") from None
    if not rows:
        raise IngestError(f"{path.name}: not a readable Parquet file")
    # Depth-first schema tree: the root, then each field followed by its children.
    names: list[str] = []
    pending = [int(rows[0][1] or 0)]  # children still to read at each open level
    for name, children in rows[1:]:
        while pending and pending[-1] == 0:
            pending.pop()
        if not pending:
            raise IngestError(f"{path.name}: not a readable Parquet file")
        pending[-1] -= 1
        if len(pending) == 1:
            names.append(str(name))
        if children:
            pending.append(int(children))
    if any(pending):
        raise IngestError(f"{path.name}: not a readable Parquet file")
    return names


def content_hash(files: list[Path]) -> str:
    """SHA-256 over the files' names, sizes and bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# Loading ---------------------------------------------------------------------------------


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _delimited_source(sf: SourceFile, spec: TableSpec, stage: str) -> str:
    """A subquery reading the delimited file with the spec's types; bad lines go to the
    rejects table ``{stage}_rejects`` (see :func:`_check_rejects`)."""
    types = spec.duckdb_columns()
    # DATE columns are read as TIMESTAMP so "2020-01-31 00:00:00" (a common export of dates)
    # is accepted, then truncated to the date; files writing YYYYMMDD are read in that format.
    compact = sf.compact_dates
    read_types = {c: "TIMESTAMP" if types[c] == "DATE" and not compact else types[c]
                  for c in sf.columns}
    columns = "{" + ", ".join(f"{_lit(c)}: {_lit(read_types[c])}" for c in sf.columns) + "}"
    select_list = ", ".join(
        f"CAST({_q(c)} AS DATE) AS {_q(c)}" if types[c] == "DATE" else _q(c)
        for c in sf.columns)
    rejects, scan = f"{stage}_rejects", f"{stage}_scan"
    assert sf.delimiter is not None
    date_format = ", dateformat='%Y%m%d'" if compact else ""
    quote = "'\"'" if sf.quoted else "''"
    return (f"(SELECT {select_list} FROM read_csv({_lit(str(sf.path))}, "
            f"auto_detect=false, header=true, delim={_lit(sf.delimiter)}, quote={quote}, "
            f"escape={quote}, columns={columns}{date_format}, store_rejects=true, "
            f"rejects_table={_lit(rejects)}, rejects_scan={_lit(scan)}))")


def _check_rejects(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec,
                   stage: str) -> None:
    """Raise for the first line DuckDB rejected while reading the delimited file."""
    types = spec.duckdb_columns()
    rejects = f"{stage}_rejects"
    first = con.execute(
        f"SELECT line, column_idx, column_name, CAST(error_type AS VARCHAR) FROM {rejects} "
        "ORDER BY line, error_type = 'CAST', column_idx LIMIT 1").fetchone()
    if first is not None:
        total = con.execute(f"SELECT count(DISTINCT line) FROM {rejects}").fetchone()
        line, idx, column, kind = first
        where = f"column {column}" if column else f"field {idx}"
        if kind == "CAST":
            where += f" ({types.get(str(column).lower(), '?')})"
        more = f" ({int(total[0]) - 1} more bad line(s))" if total and total[0] > 1 else ""
        raise IngestError(f"{sf.path.name} line {line}, {where}: "
                          f"{_REJECT_TEXT.get(kind, kind.lower())}{more}")


def _stage_delimited(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec,
                     stage: str) -> None:
    con.execute(f"CREATE TEMP TABLE {stage} AS SELECT * FROM "
                f"{_delimited_source(sf, spec, stage)}")
    _check_rejects(con, sf, spec, stage)


def _parquet_source(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec) -> str:
    """A subquery reading the Parquet file with the spec's types (row numbers from 0 in
    ``_spe_pos``), after one scan that names the first value of a wrong type."""
    types = spec.duckdb_columns()
    src = f"read_parquet({_lit(str(sf.path))}, file_row_number=true)"
    described = con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()
    by_lower = {str(r[0]).strip().lower(): (str(r[0]), str(r[1])) for r in described}
    # One scan finds the first bad value of every column whose type needs a conversion.
    convert = [c for c in sf.columns if by_lower[c][1] != types[c]]
    if convert:
        probes = ", ".join(
            f"min(file_row_number) FILTER (WHERE {_q(by_lower[c][0])} IS NOT NULL AND "
            f"TRY_CAST({_q(by_lower[c][0])} AS {types[c]}) IS NULL)" for c in convert)
        bad = con.execute(f"SELECT {probes} FROM {src}").fetchone()
        assert bad is not None
        found = [(int(row), column) for row, column in zip(bad, convert, strict=True)
                 if row is not None]
        if found:
            row, column = min(found)
            raise IngestError(f"{sf.path.name} row {row + 1}, column {column} "
                              f"({types[column]}): value does not match the column type")
    select_list = ", ".join(
        (_q(by_lower[c][0]) if c not in convert
         else f"TRY_CAST({_q(by_lower[c][0])} AS {types[c]})") + f" AS {_q(c)}"
        for c in sf.columns)
    return f"(SELECT {select_list}, file_row_number AS _spe_pos FROM {src})"


def _stage_parquet(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec,
                   stage: str) -> None:
    """Stage a Parquet file; its row numbers (from 0) are kept in ``_spe_pos``."""
    con.execute(f"CREATE TEMP TABLE {stage} AS SELECT * FROM {_parquet_source(con, sf, spec)}")


def _position(sf: SourceFile) -> str:
    """Staging expression giving a row's position in its file (0 = first data row)."""
    return "_spe_pos" if sf.kind == "parquet" else "rowid"


def _line(sf: SourceFile, position: int) -> str:
    """Where a staged row came from (header is line 1; Parquet rows count from 1)."""
    if sf.kind == "parquet":
        return f"row {position + 1}"
    return f"line {position + 2}"


def _check_stage(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec,
                 stage: str) -> int:
    """Required columns hold no NULL and the primary key is unique; returns the row count."""
    required = [c for c in spec.required_columns if c in sf.columns]
    counts = [f"count(*) FILTER (WHERE {_q(c)} IS NULL)" for c in required]
    row = con.execute(f"SELECT count(*) {''.join(', ' + c for c in counts)} "
                      f"FROM {stage}").fetchone()
    assert row is not None
    rows = int(row[0])
    for column, nulls in zip(required, row[1:], strict=True):
        if nulls:
            first = con.execute(f"SELECT min({_position(sf)}) FROM {stage} "
                                f"WHERE {_q(column)} IS NULL").fetchone()
            assert first is not None
            raise IngestError(f"{sf.path.name} {_line(sf, int(first[0]))}, column {column}: "
                              f"required value is empty ({nulls} row(s) in all)")
    for key in spec.primary_key:
        if key not in sf.columns:
            continue
        dup = con.execute(f"SELECT count(*) - count(DISTINCT {_q(key)}) "
                          f"FROM {stage}").fetchone()
        if dup and dup[0]:
            first = con.execute(
                f"SELECT min(pos) FROM (SELECT {_position(sf)} AS pos, row_number() OVER "
                f"(PARTITION BY {_q(key)} ORDER BY {_position(sf)}) AS n FROM {stage}) "
                "WHERE n > 1"
            ).fetchone()
            assert first is not None
            raise IngestError(f"{sf.path.name} {_line(sf, int(first[0]))}, column {key}: "
                              f"duplicate {key} ({dup[0]} duplicate row(s) in all; "
                              f"{key} must be unique in {spec.name})")
    return rows


def _check_temporal(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec,
                    stage: str) -> None:
    """Dates and timestamps lie in years 1..9999 (finite): converting any stored DATE to a
    TIMESTAMP in a query can then never fail, whatever the file held (Parquet can store
    dates far outside the timestamp range, and 'infinity')."""
    temporal = [f for f in spec.fields if f.name in sf.columns
                and f.duckdb_type in ("DATE", "TIMESTAMP")]
    if not temporal:
        return
    probes = ", ".join(
        f"min({_position(sf)}) FILTER (WHERE {_q(f.name)} IS NOT NULL AND NOT ("
        f"isfinite({_q(f.name)}) AND {_q(f.name)} >= {f.duckdb_type} '{_MIN_TIME}' AND "
        f"{_q(f.name)} < {f.duckdb_type} '{_MAX_TIME}'))" for f in temporal)
    bad = con.execute(f"SELECT {probes} FROM {stage}").fetchone()
    assert bad is not None
    found = [(int(pos), f) for pos, f in zip(bad, temporal, strict=True) if pos is not None]
    if found:
        pos, f = min(found, key=lambda item: item[0])
        raise IngestError(f"{sf.path.name} {_line(sf, pos)}, column {f.name} "
                          f"({f.duckdb_type}): outside the years 1 to 9999")


_MIN_TIME = "0001-01-01"
_MAX_TIME = "10000-01-01"


def _link_parts(spec: TableSpec, link: tuple[LinkHop, ...], built: dict[str, TableMeta],
                alias: str) -> tuple[str, str]:
    """(LEFT JOINs, person expression) resolving a linked table's rows (``alias``) to their
    person through ``link``; at most one hop applies to a row (checked with the declaration)."""
    joins, persons = [], []
    for i, hop in enumerate(link):
        parent = built.get(hop.table)
        if parent is None:
            continue  # rows that need this hop do not resolve: reported by the checks
        unit = parent.privacy_unit
        if not parent.person_level or unit is None:
            raise IngestError(f"{spec.name}: its link {hop.describe()} reaches the "
                              f"{parent.kind} table {parent.name}, which holds no person")
        cond = f"{alias}.{_q(hop.column)} = h{i}._spe_k"
        if hop.when_column is not None and hop.when_value is not None:
            cond += f" AND {alias}.{_q(hop.when_column)} = {_lit(hop.when_value)}"
        joins.append(f"LEFT JOIN (SELECT {_q(hop.parent_column)} AS _spe_k, {_q(unit)} AS _spe_p "
                     f"FROM {_q(parent.name)}) AS h{i} ON {cond}")
        persons.append(f"h{i}._spe_p")
    person = f"coalesce({', '.join(persons)})" if len(persons) > 1 else (
        persons[0] if persons else "CAST(NULL AS BIGINT)")
    return " ".join(joins), person


def _resolve_link(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec,
                  stage: str, link: tuple[LinkHop, ...], built: dict[str, TableMeta]) -> str:
    """Stage ``stage`` with ``LINKED_PERSON_COLUMN``: the person each row reaches through
    ``link``. A row that reaches nobody is an ``IngestError`` naming its line; returns the
    new stage's name."""
    joins, person = _link_parts(spec, link, built, "s")
    linked = f"{stage}_linked"
    con.execute(f"CREATE TEMP TABLE {linked} AS SELECT s.*, s.{_position(sf)} AS _spe_at, "
                f"{person} AS {_q(LINKED_PERSON_COLUMN)} FROM {stage} AS s {joins}")
    row = con.execute(f"SELECT count(*), min(_spe_at) FROM {linked} "
                      f"WHERE {_q(LINKED_PERSON_COLUMN)} IS NULL").fetchone()
    assert row is not None
    if row[0]:
        paths = " or ".join(h.describe() for h in link)
        raise IngestError(
            f"{sf.path.name} {_line(sf, int(row[1]))}: the row does not reach a person through "
            f"{paths} ({row[0]} row(s) in all); every row of {spec.name} must belong to "
            "exactly one person (fix the rows, ship the table they point to, or declare the "
            f"table `kind: refused` to keep it out of queries)")
    con.execute(f"DROP TABLE {stage}")
    return linked


def _final_columns(sf: SourceFile, spec: TableSpec, unit: str | None,
                   rank: str | None) -> list[str]:
    """The stored columns: the spec's (NULL where the file lacks one), then the hidden person
    column of a linked table and the row rank (``rank``, an expression) of a person-level one."""
    cols = [
        _q(f.name) if f.name in sf.columns else f"CAST(NULL AS {f.duckdb_type}) AS {_q(f.name)}"
        for f in spec.fields
    ]
    if unit is not None:
        if unit != PRIVACY_UNIT:
            cols.append(_q(unit))
        assert rank is not None
        cols.append(f"{rank} AS {_q(ROW_RANK_COLUMN)}")
    return cols


def _rank_key(sf: SourceFile) -> str | None:
    """The column that identifies a row of the file for :func:`_rank_query`: a Parquet file's
    row number. None for delimited files: reading a CSV file twice in one statement (rows and
    ranks) costs as much CPU as ranking whole rows and, measured at 400k persons, 40 % more
    peak memory; their ranks are computed over the whole rows."""
    return "_spe_pos" if sf.kind == "parquet" else None


def _rank_query(source: str, unit: str, key: str) -> str:
    """A subquery (``_spe_k`` row key, ``_spe_u`` person, ``_spe_r`` rank): a uniformly random
    rank of each row among its person's rows, computed over the key and person columns only,
    so the window sorts two columns rather than whole rows (DuckDB reads only these columns
    of the file)."""
    return (f"(SELECT _spe_k, _spe_u, row_number() OVER (PARTITION BY _spe_u ORDER BY "
            f"_spe_draw) AS _spe_r FROM (SELECT {_q(key)} AS _spe_k, {_q(unit)} AS _spe_u, "
            f"random() AS _spe_draw FROM {source}))")


def _build_checked(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec,
                   meta: TableMeta, built: dict[str, TableMeta], stage: str) -> int | None:
    """Fast path: load the file straight into its final table (typed, linked, ranked) and run
    every check in one aggregate over it. Returns the row count, or None when a check failed
    (the table is dropped; :func:`_build_staged` then finds and names the first bad line).

    Ranks: a table with one row per person (its key is the person) ranks every row 1 (a
    duplicated person fails the key check). From a Parquet file, the ranks are drawn over the
    row number and person only (:func:`_rank_query`, a second scan of two columns) and joined
    to the rows by row number; a row that finds no rank, or a rank drawn for another person
    (the file changed between the scans), gets a NULL rank, which fails the checks. Row
    numbers are unique, so every row holds a distinct rank among its person's rows. Other files
    rank whole rows in one window."""
    if sf.kind == "parquet":
        source = _parquet_source(con, sf, spec)
    else:
        source = _delimited_source(sf, spec, stage)
    unit = meta.privacy_unit
    if meta.kind == "linked":
        joins, person = _link_parts(spec, tuple(meta.link), built, "s")
        source = (f"(SELECT s.*, {person} AS {_q(LINKED_PERSON_COLUMN)} FROM {source} AS s "
                  f"{joins})")
    order, rank, joined = "", None, False
    if unit is not None and spec.primary_key == [unit]:
        rank = "1"
    elif unit is not None:
        # Stored in rank order: a query's truncation filter (rank <= k) then reads a prefix of
        # the table and DuckDB skips the row groups above k by their min/max.
        order = f" ORDER BY {_q(ROW_RANK_COLUMN)}"
        key = _rank_key(sf)
        if key is None:
            # Window ORDER BY may not be volatile: draw the random key in a subquery.
            source = f"(SELECT *, random() AS _spe_draw FROM {source})"
            rank = f"row_number() OVER (PARTITION BY {_q(unit)} ORDER BY _spe_draw)"
        else:
            source = (f"{source} AS s LEFT JOIN {_rank_query(source, unit, key)} AS r "
                      f"ON s.{_q(key)} = r._spe_k")
            rank = f"CASE WHEN r._spe_u = s.{_q(unit)} THEN r._spe_r END"
            joined = True
    if joined:
        # Build the join's hash table on the ranks, never on the file's rows (when DuckDB
        # misjudges the sides' sizes, e.g. behind a linked table's joins).
        con.execute("SET disabled_optimizers = 'build_side_probe_side,join_order'")
    try:
        con.execute(f"CREATE TABLE {_q(spec.name)} AS SELECT "
                    f"{', '.join(_final_columns(sf, spec, unit, rank))} FROM {source}{order}")
    finally:
        if joined:
            con.execute("RESET disabled_optimizers")
    if sf.kind != "parquet":
        _check_rejects(con, sf, spec, stage)
    checks = ["count(*)"]
    checks += [f"count(*) FILTER (WHERE {_q(c)} IS NULL)"
               for c in spec.required_columns if c in sf.columns]
    types = spec.duckdb_columns()
    checks += [_duplicates_check(con, spec.name, k, types[k]) for k in spec.primary_key
               if k in sf.columns]
    checks += [f"count(*) FILTER (WHERE {_q(f.name)} IS NOT NULL AND NOT ("
               f"isfinite({_q(f.name)}) AND {_q(f.name)} >= {f.duckdb_type} '{_MIN_TIME}' AND "
               f"{_q(f.name)} < {f.duckdb_type} '{_MAX_TIME}'))"
               for f in spec.fields if f.name in sf.columns
               and f.duckdb_type in ("DATE", "TIMESTAMP")]
    if meta.kind == "linked":
        checks.append(f"count(*) FILTER (WHERE {_q(LINKED_PERSON_COLUMN)} IS NULL)")
    if unit is not None:
        checks.append(f"count(*) FILTER (WHERE {_q(ROW_RANK_COLUMN)} IS NULL)")
    row = con.execute(f"SELECT {', '.join(checks)} FROM {_q(spec.name)}").fetchone()
    assert row is not None
    if any(int(v or 0) for v in row[1:]):
        con.execute(f"DROP TABLE {_q(spec.name)}")
        return None
    return int(row[0])


_INTEGER_TYPES = ("BIGINT", "INTEGER", "SMALLINT", "TINYINT")
_BITMAP_BITS_PER_ROW = 64  # a key range up to 64x the row count: a bitmap of 8 bytes a row


def _duplicates_check(con: duckdb.DuckDBPyConnection, table: str, key: str,
                      key_type: str) -> str:
    """An aggregate over ``table`` that is 0 exactly when ``key`` holds distinct values and
    no NULL: ``count(*)`` less the number of distinct values. An integer key whose range is
    at most 64 times the row count is counted in a bitmap over its range (``bitstring_agg``:
    measured 6x faster than ``count(DISTINCT)`` on 1.9M ids); other keys by
    ``count(DISTINCT)``."""
    if key_type in _INTEGER_TYPES:
        row = con.execute(f"SELECT min({_q(key)}), max({_q(key)}), count(*) "
                          f"FROM {_q(table)}").fetchone()
        assert row is not None
        lo, hi, rows = row
        if lo is None:  # no value at all: every row counts as a missing one
            return "count(*)"
        if int(hi) - int(lo) < max(_BITMAP_BITS_PER_ROW * int(rows), 1 << 16):
            return (f"count(*) - bit_count(bitstring_agg({_q(key)}, {int(lo)}::{key_type}, "
                    f"{int(hi)}::{key_type}))")
    return f"count(*) - count(DISTINCT {_q(key)})"


def _build_staged(con: duckdb.DuckDBPyConnection, sf: SourceFile, spec: TableSpec,
                  meta: TableMeta, built: dict[str, TableMeta], stage: str) -> int:
    """Slow path, after a failed check: stage the file with its line positions and raise the
    first problem naming file, line and column."""
    if sf.kind == "parquet":
        _stage_parquet(con, sf, spec, stage)
    else:
        _stage_delimited(con, sf, spec, stage)
    rows = _check_stage(con, sf, spec, stage)
    _check_temporal(con, sf, spec, stage)
    if meta.kind == "linked":
        stage = _resolve_link(con, sf, spec, stage, tuple(meta.link), built)
    raise IngestError(f"{sf.path.name}: a check failed on {rows} rows but no line could be "
                      "named; the file may have changed during ingest")


def _table_meta(spec: TableSpec, rows: int, decl: defaults.Declaration) -> TableMeta:
    columns = [defaults.column_meta(spec.name, f.name, f.duckdb_type, f.required, decl)
               for f in spec.fields]
    kind, link, refusal = defaults.table_kind(spec, decl)
    unit = defaults.person_column(kind)
    return TableMeta(
        name=spec.name,
        columns=columns,
        row_count=rows,
        kind=kind,
        link=list(link),
        refusal=refusal,
        privacy_unit=unit,
        max_rows_per_person=defaults.max_rows_per_person(spec.name, decl),
        unique_key=spec.primary_key,
        row_rank_column=ROW_RANK_COLUMN if unit is not None else None,
    )


def _ingest_order(files: list[SourceFile], decl: defaults.Declaration) -> list[SourceFile]:
    """person first, then other tables, linked tables after the tables they link to."""
    specs = load_spec()
    by_name = {f.table: f for f in files}
    ordered = [by_name[t] for t in sorted(by_name, key=lambda t: (t != "person", t))
               if defaults.table_kind(specs[t], decl)[0] != "linked"]
    pending = sorted(t for t in by_name if defaults.table_kind(specs[t], decl)[0] == "linked")
    placed = {f.table for f in ordered}
    while pending:
        ready = [t for t in pending
                 if all(h.table in placed or h.table not in by_name
                        for h in defaults.table_kind(specs[t], decl)[1])]
        if not ready:
            raise IngestError("the declared links form a cycle: " + ", ".join(pending))
        for t in ready:
            ordered.append(by_name[t])
            placed.add(t)
            pending.remove(t)
    return ordered


def _source_format(files: list[SourceFile]) -> str:
    kinds = {f.kind for f in files}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def build_database(settings: Settings, name: str, files: list[SourceFile],
                   decl: defaults.Declaration, target: Path, *,
                   progress: bool = False) -> tuple[dict[str, TableMeta], dict[str, float]]:
    """Load ``files`` into a new DuckDB file ``target``; per-table metadata and seconds."""
    specs = load_spec()
    tmpdir = target.parent / f".{target.name}.spill"
    tables: dict[str, TableMeta] = {}
    seconds: dict[str, float] = {}
    con = duckdb.connect(str(target))
    try:
        os.chmod(target, 0o600)
        tmpdir.mkdir(mode=0o700)
        con.execute(f"SET threads = {int(settings.duckdb_threads)}")
        con.execute(f"SET memory_limit = {_lit(settings.duckdb_memory_limit)}")
        con.execute(f"SET temp_directory = {_lit(str(tmpdir))}")
        con.execute("SET preserve_insertion_order = true")
        ordered = _ingest_order(files, decl)
        with tqdm(ordered, desc=f"ingesting {name}", unit="table", file=sys.stderr,
                  disable=not progress) as bar:
            for index, sf in enumerate(bar):
                bar.set_postfix_str(sf.table)
                started = time.perf_counter()
                spec = specs[sf.table]
                stage = f"_spe_stage_{index}"
                meta = _table_meta(spec, 0, decl)
                rows = _build_checked(con, sf, spec, meta, tables, stage)
                if rows is None:
                    _build_staged(con, sf, spec, meta, tables, f"{stage}_again")
                    raise AssertionError("unreachable: the staged build raises")
                tables[sf.table] = meta.model_copy(update={"row_count": rows})
                seconds[sf.table] = time.perf_counter() - started
        con.execute("CHECKPOINT")
    except duckdb.Error as exc:
        # DuckDB messages can quote data values: report the kind of error only.
        raise IngestError(f"ingest failed in DuckDB ({type(exc).__name__}); "
                          "check the files' encoding and format") from None
    finally:
        con.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return tables, seconds


# Registration ----------------------------------------------------------------------------


def _audit_failure(db: Database, principal: Principal, name: str, source: Path,
                   reason: str) -> None:
    try:
        with db.write() as session:
            record(session, AuditEvent(
                action="dataset.ingest", actor=principal.actor, role=principal.primary_role(),
                target=name, outcome=Outcome.FAILURE, reason=reason[:2000],
                details={"source": str(source)}))
    except Exception:  # never mask the original error
        log.exception("could not audit a failed ingest")


def _exists(db: Database, name: str) -> bool:
    with db.read() as session:
        return session.execute(
            select(DatasetRecord.id).where(DatasetRecord.name == name)).first() is not None


def ingest(db: Database, settings: Settings, name: str, source: Path, principal: Principal,
           *, progress: bool = False) -> IngestResult:
    """Ingest ``source`` as dataset ``name`` (see module docstring for the contract)."""
    started = time.perf_counter()
    source = Path(source)
    try:
        return _ingest(db, settings, name, source, principal, progress, started)
    except SPEError as exc:
        _audit_failure(db, principal, name, source, exc.detail)
        raise
    except Exception as exc:
        _audit_failure(db, principal, name, source, f"internal error ({type(exc).__name__})")
        raise


def _ingest(db: Database, settings: Settings, name: str, source: Path, principal: Principal,
            progress: bool, started: float) -> IngestResult:
    check_name(name)
    store = ensure_store(settings)
    with recovery.ingest_lock(settings.data_dir / "locks", name):
        return _ingest_locked(db, settings, name, source, principal, progress, started, store)


def _ingest_locked(db: Database, settings: Settings, name: str, source: Path,
                   principal: Principal, progress: bool, started: float,
                   store: Path) -> IngestResult:
    if _exists(db, name):
        raise Conflict(f"dataset {name!r} already exists; remove it first or choose "
                       "another name")
    files = discover(source)
    decl, decl_path = defaults.load_declaration(source, load_spec())
    final = store_path(settings, name)
    if final.exists():
        raise Conflict(f"the store already holds a file for dataset {name!r} that is not "
                       "registered; nothing was overwritten (move it away to ingest again)")
    # We hold the lock and the registry has no row: temporary files of this name in the store
    # were left by an ingest that died (see spe.datasets.recovery). Remove them, on the record.
    swept = recovery.sweep(store, name)
    if swept:
        with db.write() as session:
            record(session, AuditEvent(
                action="dataset.recover", actor=principal.actor, role=principal.primary_role(),
                target=name, details={"removed": swept}))
    tmp = store / f".{name}.{uuid.uuid4().hex}.tmp{STORE_SUFFIX}"
    moved = False
    try:
        # The files are hashed on a second thread while DuckDB loads them: hashing and file
        # reads release the GIL, and DuckDB leaves a core idle for part of every load.
        with ThreadPoolExecutor(1, thread_name_prefix="spe-ingest-hash") as pool:
            hashing = pool.submit(
                content_hash, [f.path for f in files] + ([decl_path] if decl_path else []))
            tables, seconds = build_database(settings, name, files, decl, tmp,
                                             progress=progress)
            digest = hashing.result()
        meta = DatasetMetadata(
            name=name, cdm_version=CDM_VERSION, privacy_unit=PRIVACY_UNIT,
            max_groups_per_person=decl.max_groups_per_person or 1,
            tables=tables, source_format=_source_format(files), content_sha256=digest)
        total = sum(t.row_count for t in tables.values())
        with db.write() as session:
            session.add(DatasetRecord(name=name, store_file=final.name,
                                      created_by=principal.actor, total_rows=total,
                                      meta=meta.model_dump(mode="json")))
            record(session, AuditEvent(
                action="dataset.ingest", actor=principal.actor, role=principal.primary_role(),
                target=name, details={"rows": total, "tables": sorted(tables),
                                      "content_sha256": digest, "source": str(source),
                                      "declaration": decl_path.name if decl_path else None}))
            session.flush()
            if final.exists():
                raise Conflict(f"the store already holds a file for dataset {name!r}")
            os.replace(tmp, final)
            moved = True
        return IngestResult(name=name, metadata=meta, path=final, seconds=seconds,
                            total_seconds=time.perf_counter() - started)
    except IntegrityError:
        if moved:
            with contextlib.suppress(FileNotFoundError):
                final.unlink()
        raise Conflict(f"dataset {name!r} already exists; nothing was overwritten") from None
    except BaseException:
        if moved:
            with contextlib.suppress(FileNotFoundError):
                final.unlink()
        raise
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
