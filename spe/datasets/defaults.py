"""Built-in DP metadata for common OMOP columns, and the data holder's declaration file.

Contract:

* ``BUILTIN`` holds data-independent defaults (bounds for clamping, public value sets, calendar
  year ranges) for well-known OMOP columns. They never look at the data.
* A data holder overrides or extends them with a declaration file beside the data:
  ``spe-metadata.yaml`` (or ``.yml``) or ``spe-metadata.toml`` — at most one of them. Shape::

      version: 1
      max_groups_per_person: 1          # optional
      tables:
        measurement:
          max_rows_per_person: 20       # optional
          columns:
            value_as_number: {lower: 0, upper: 500}
            measurement_concept_id: {public_values: [3004410, 3016723]}
            measurement_date: {year_lower: 2000, year_upper: 2024}
        location:
          kind: public                  # declared public reference data
        note_nlp:                       # the default path, spelled out
          kind: linked
          link: [{column: note_id, table: note, parent_column: note_id}]

  A key given in the declaration replaces the built-in value for that key; ``null`` removes it.
* Every table gets exactly one kind (``spe.datasets.metadata.TableMeta``): tables holding
  ``person_id`` are per-person (that cannot be declared away); ``DEFAULT_LINKS`` links the OMOP
  tables that reach a person through a foreign key; ``DEFAULT_PUBLIC_TABLES`` are public; a
  declaration may make any other table ``public`` or ``linked`` (or any non-per-person table
  ``refused``); everything else is refused in queries. Kinds are decided here, from the
  declaration and the spec, never from the data or from column names at query time.
* Public value lists are normalised to the column's type (the engine's key form): exact
  repeats are dropped, two spellings of one value (``8507`` and ``"8507"``) are refused;
  bounds are finite and ordered after the built-in defaults are overlaid.
* ``load_declaration`` validates the file with pydantic and against the OMOP spec and raises
  ``IngestError`` with one line per problem (file, table, column, what is wrong); never the
  file's raw content.
"""

from __future__ import annotations

import math
import tomllib
from datetime import date
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spe.datasets.metadata import (
    DEFAULT_PUBLIC_TABLES,
    LINKED_PERSON_COLUMN,
    PRIVACY_UNIT,
    ColumnMeta,
    LinkHop,
    TableKind,
    refusal_text,
)
from spe.datasets.omop_spec import NUMERIC_TYPES, TEMPORAL_TYPES, TableSpec
from spe.errors import IngestError

T = TypeVar("T")

DECLARATION_NAMES = ("spe-metadata.yaml", "spe-metadata.yml", "spe-metadata.toml")

#: Default k (rows one person contributes per group) per table; other tables use 10.
DEFAULT_MAX_ROWS = {"person": 1, "death": 1, "observation_period": 2}
DEFAULT_K = 10

_DP_KEYS = ("lower", "upper", "public_values", "year_lower", "year_upper")


class ColumnDeclaration(BaseModel):
    """DP metadata for one column. Unset keys keep the built-in default."""

    model_config = ConfigDict(extra="forbid")

    lower: float | None = Field(None, allow_inf_nan=False)
    upper: float | None = Field(None, allow_inf_nan=False)
    public_values: list[int | str] | None = Field(None, max_length=100_000)
    year_lower: int | None = Field(None, ge=1800, le=2200)
    year_upper: int | None = Field(None, ge=1800, le=2200)

    @model_validator(mode="after")
    def _ordered(self) -> ColumnDeclaration:
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError("lower must not exceed upper")
        if (self.year_lower is not None and self.year_upper is not None
                and self.year_lower > self.year_upper):
            raise ValueError("year_lower must not exceed year_upper")
        return self


class LinkDeclaration(BaseModel):
    """One hop of a linked table's path to its person (see ``LinkHop``)."""

    model_config = ConfigDict(extra="forbid")

    column: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    table: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    parent_column: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    when_column: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    when_value: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _when_pair(self) -> LinkDeclaration:
        if (self.when_column is None) != (self.when_value is None):
            raise ValueError("when_column and when_value go together")
        return self


class TableDeclaration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["public", "linked", "refused"] | None = None
    link: list[LinkDeclaration] | None = Field(None, min_length=1, max_length=20)
    max_rows_per_person: int | None = Field(None, ge=1, le=10_000)
    columns: dict[str, ColumnDeclaration] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _link_only_when_linked(self) -> TableDeclaration:
        if self.link is not None and self.kind != "linked":
            raise ValueError("link is declared only with kind: linked")
        return self


class Declaration(BaseModel):
    """The whole declaration file."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(1, ge=1, le=1)
    max_groups_per_person: int | None = Field(None, ge=1, le=10_000)
    tables: dict[str, TableDeclaration] = Field(default_factory=dict)


#: Event tables that OMOP ``cost`` rows point at, by the domain ``cost_domain_id`` names.
COST_DOMAINS = {
    "Visit": ("visit_occurrence", "visit_occurrence_id"),
    "Visit Detail": ("visit_detail", "visit_detail_id"),
    "Condition": ("condition_occurrence", "condition_occurrence_id"),
    "Drug": ("drug_exposure", "drug_exposure_id"),
    "Procedure": ("procedure_occurrence", "procedure_occurrence_id"),
    "Device": ("device_exposure", "device_exposure_id"),
    "Measurement": ("measurement", "measurement_id"),
    "Observation": ("observation", "observation_id"),
    "Specimen": ("specimen", "specimen_id"),
    "Note": ("note", "note_id"),
    "Episode": ("episode", "episode_id"),
}

#: OMOP 5.4 tables without ``person_id`` that reach exactly one person through a foreign key.
DEFAULT_LINKS: dict[str, tuple[LinkHop, ...]] = {
    "note_nlp": (LinkHop(column="note_id", table="note", parent_column="note_id"),),
    "episode_event": (LinkHop(column="episode_id", table="episode",
                              parent_column="episode_id"),),
    "cost": tuple(LinkHop(column="cost_event_id", table=table, parent_column=key,
                          when_column="cost_domain_id", when_value=domain)
                  for domain, (table, key) in COST_DOMAINS.items()),
}


def _this_year() -> int:
    return date.today().year


_TYPE_CONCEPTS = [32817, 32810, 32818, 32838, 32815, 32879, 32856, 32831, 32865, 0]
_EVENT_YEARS = {"year_lower": 1990}


def _builtin() -> dict[str, dict[str, Any]]:
    """Defaults keyed by column name (they apply in every table holding the column)."""
    year = _this_year()
    events = {**_EVENT_YEARS, "year_upper": year}
    by_column: dict[str, dict[str, Any]] = {
        "year_of_birth": {"lower": 1900, "upper": year},
        "month_of_birth": {"lower": 1, "upper": 12},
        "day_of_birth": {"lower": 1, "upper": 31},
        "birth_datetime": {"year_lower": 1900, "year_upper": year},
        "gender_concept_id": {"public_values": [8507, 8532, 0]},
        "race_concept_id": {"public_values": [8527, 8516, 8515, 8557, 8657, 0]},
        "ethnicity_concept_id": {"public_values": [38003563, 38003564, 0]},
        "visit_concept_id": {"public_values": [9201, 9202, 9203, 262, 581476, 581477, 0]},
        "value_as_number": {"lower": 0, "upper": 1000},
        "range_low": {"lower": 0, "upper": 1000},
        "range_high": {"lower": 0, "upper": 1000},
        "quantity": {"lower": 0, "upper": 1000},
        "days_supply": {"lower": 0, "upper": 365},
        "refills": {"lower": 0, "upper": 12},
    }
    for column in ("period_type_concept_id", "visit_type_concept_id",
                   "condition_type_concept_id", "drug_type_concept_id",
                   "measurement_type_concept_id", "death_type_concept_id",
                   "procedure_type_concept_id", "observation_type_concept_id",
                   "device_type_concept_id"):
        by_column[column] = {"public_values": list(_TYPE_CONCEPTS)}
    for column in ("observation_period_start_date", "observation_period_end_date",
                   "visit_start_date", "visit_end_date", "visit_start_datetime",
                   "visit_end_datetime", "condition_start_date", "condition_end_date",
                   "condition_start_datetime", "condition_end_datetime",
                   "drug_exposure_start_date", "drug_exposure_end_date",
                   "drug_exposure_start_datetime", "drug_exposure_end_datetime",
                   "verbatim_end_date", "measurement_date", "measurement_datetime",
                   "death_date", "death_datetime", "procedure_date", "observation_date"):
        by_column[column] = dict(events)
    return by_column


BUILTIN: dict[str, dict[str, Any]] = _builtin()


def _format_validation(error: ValidationError, where: str) -> str:
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{where}: {loc}: {item['msg']}")
    return "\n".join(lines)


def find_declaration(directory: Path) -> Path | None:
    """The declaration file in ``directory`` (None if absent); IngestError if several."""
    found = [directory / n for n in DECLARATION_NAMES if (directory / n).is_file()]
    if len(found) > 1:
        raise IngestError(
            "more than one declaration file: " + ", ".join(p.name for p in found)
            + "; keep exactly one"
        )
    return found[0] if found else None


def parse_declaration(path: Path) -> Declaration:
    """Read and validate one declaration file (structure only)."""
    try:
        if path.suffix == ".toml":
            raw: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        if isinstance(exc, tomllib.TOMLDecodeError):
            where = f" ({str(exc).split('(')[-1].rstrip(')')})" if "(" in str(exc) else ""
        raise IngestError(f"{path.name}: not valid {path.suffix[1:].upper()}{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise IngestError(f"{path.name}: the top level must be a mapping")
    try:
        return Declaration.model_validate(raw)
    except ValidationError as exc:
        raise IngestError(
            f"{path.name} is not a valid declaration:\n{_format_validation(exc, path.name)}"
        ) from None


def check_declaration(decl: Declaration, specs: dict[str, TableSpec], where: str) -> None:
    """Check table/column names and that each key fits the column's type."""
    problems: list[str] = []
    for table, tdecl in decl.tables.items():
        spec = specs.get(table.lower())
        if spec is None:
            problems.append(f"{where}: tables.{table}: not an OMOP CDM 5.4 table")
            continue
        problems.extend(_check_kind(spec, tdecl, specs, f"{where}: tables.{table}"))
        for column, cdecl in tdecl.columns.items():
            field = spec.field(column.lower())
            loc = f"{where}: tables.{table}.columns.{column}"
            if field is None:
                problems.append(f"{loc}: not a column of {spec.name}")
                continue
            given = cdecl.model_fields_set
            if given & {"lower", "upper"} and field.duckdb_type not in NUMERIC_TYPES:
                problems.append(f"{loc}: lower/upper need a numeric column "
                                f"(this one is {field.duckdb_type})")
            if given & {"year_lower", "year_upper"} and field.duckdb_type not in TEMPORAL_TYPES:
                problems.append(f"{loc}: year_lower/year_upper need a date column "
                                f"(this one is {field.duckdb_type})")
            if "public_values" in given and field.duckdb_type not in ("BIGINT", "VARCHAR"):
                problems.append(f"{loc}: public_values need an integer or text column "
                                f"(this one is {field.duckdb_type})")
            elif cdecl.public_values is not None:
                try:
                    normalise_public_values(cdecl.public_values, field.duckdb_type)
                except ValueError as exc:
                    problems.append(f"{loc}: public_values: {exc}")
    if problems:
        raise IngestError("invalid declaration:\n" + "\n".join(problems))


def _check_kind(spec: TableSpec, tdecl: TableDeclaration, specs: dict[str, TableSpec],
                loc: str) -> list[str]:
    if tdecl.kind is None:
        return []
    if spec.has_person_id:
        return [f"{loc}: kind: {tdecl.kind}: {spec.name} carries {PRIVACY_UNIT}, so it is "
                "per-person (that cannot be declared otherwise)"]
    if tdecl.kind != "linked":
        return []
    if tdecl.link is None:
        return [] if spec.name in DEFAULT_LINKS else [
            f"{loc}: kind: linked needs a link (column, table, parent_column)"]
    problems = []
    for i, hop in enumerate(tdecl.link):
        hloc = f"{loc}.link.{i}"
        field = spec.field(hop.column.lower())
        if field is None:
            problems.append(f"{hloc}: column {hop.column!r} is not a column of {spec.name}")
        parent = specs.get(hop.table.lower())
        if parent is None:
            problems.append(f"{hloc}: {hop.table!r} is not an OMOP CDM 5.4 table")
            continue
        if parent.name == spec.name:
            problems.append(f"{hloc}: a table cannot be linked to itself")
        pfield = parent.field(hop.parent_column.lower())
        if pfield is None or parent.primary_key != [pfield.name]:
            problems.append(f"{hloc}: {hop.parent_column!r} is not the unique key of "
                            f"{parent.name} (a link must reach exactly one row)")
        elif field is not None and field.duckdb_type != pfield.duckdb_type:
            problems.append(f"{hloc}: {hop.column} ({field.duckdb_type}) and "
                            f"{parent.name}.{pfield.name} ({pfield.duckdb_type}) differ in type")
        if hop.when_column is not None and spec.field(hop.when_column.lower()) is None:
            problems.append(f"{hloc}: when_column {hop.when_column!r} is not a column of "
                            f"{spec.name}")
    whens = [(h.when_column, h.when_value) for h in tdecl.link if h.when_column is not None]
    if len(set(whens)) != len(whens):
        problems.append(f"{loc}.link: two hops share one when_column/when_value")
    unconditional = sum(1 for hop in tdecl.link if hop.when_column is None)
    if unconditional and len(tdecl.link) > 1:
        problems.append(f"{loc}.link: several hops need when_column/when_value on each, so "
                        "at most one applies to a row")
    return problems


def table_kind(spec: TableSpec, decl: Declaration
               ) -> tuple[TableKind, tuple[LinkHop, ...], str | None]:
    """The kind of one table, its link and, for refused tables, why (see module docstring)."""
    if spec.has_person_id:
        return "person", (), None
    tdecl = _lookup(decl.tables, spec.name)
    kind = tdecl.kind if tdecl is not None else None
    if kind == "public":
        return "public", (), None
    if kind == "refused":
        return "refused", (), (f"the data holder declared the table {spec.name!r} refused "
                               "in queries")
    if kind == "linked" and tdecl is not None and tdecl.link is not None:
        return "linked", tuple(
            LinkHop(column=h.column.lower(), table=h.table.lower(),
                    parent_column=h.parent_column.lower(),
                    when_column=h.when_column.lower() if h.when_column else None,
                    when_value=h.when_value) for h in tdecl.link), None
    if spec.name in DEFAULT_LINKS:
        return "linked", DEFAULT_LINKS[spec.name], None
    if spec.name in DEFAULT_PUBLIC_TABLES:
        return "public", (), None
    return "refused", (), refusal_text(spec.name)


def person_column(kind: TableKind) -> str | None:
    """The column that holds a row's person, per kind."""
    return {"person": PRIVACY_UNIT, "linked": LINKED_PERSON_COLUMN}.get(kind)


def normalise_public_values(values: list[int | str], duck_type: str) -> list[int | str]:
    """``values`` in the engine's key form for ``duck_type`` (int for BIGINT, str for
    VARCHAR), exact repeats dropped; ``ValueError`` for two spellings of one value or a value
    that is not of the column's type."""
    seen: dict[int | str, int | str] = {}
    for raw in values:
        value: int | str
        if duck_type == "BIGINT":
            if isinstance(raw, bool):
                raise ValueError("a boolean is not an integer value")
            if isinstance(raw, int):
                value = raw
            else:
                text = str(raw).strip()
                try:
                    value = int(text)
                except ValueError:
                    raise ValueError(f"the value at position {len(seen) + 1} is not an "
                                     "integer") from None
        else:
            value = raw if isinstance(raw, str) else str(raw)
        if value in seen:
            prior = seen[value]
            if type(prior) is not type(raw) or prior != raw:
                raise ValueError(f"{value!r} is listed twice in different spellings "
                                 f"({seen[value]!r} and {raw!r}); keep one")
            continue
        seen[value] = raw
    return list(seen)


def load_declaration(directory: Path, specs: dict[str, TableSpec]) -> tuple[Declaration,
                                                                           Path | None]:
    """The validated declaration beside the data, or an empty one when there is none."""
    path = find_declaration(directory)
    if path is None:
        return Declaration(), None
    decl = parse_declaration(path)
    check_declaration(decl, specs, path.name)
    return decl, path


def column_meta(table: str, spec_field_name: str, duck_type: str, required: bool,
                decl: Declaration) -> ColumnMeta:
    """ColumnMeta for one column: built-in defaults overlaid with the declaration."""
    values: dict[str, Any] = dict.fromkeys(_DP_KEYS)
    source: str | None = None
    builtin = BUILTIN.get(spec_field_name)
    if builtin is not None and _fits(builtin, duck_type):
        values.update(builtin)
        source = "default"
    tdecl = _lookup(decl.tables, table)
    cdecl = _lookup(tdecl.columns, spec_field_name) if tdecl is not None else None
    if cdecl is not None:
        for key in cdecl.model_fields_set & set(_DP_KEYS):
            values[key] = getattr(cdecl, key)
        source = "declared"
    if all(values[k] is None for k in _DP_KEYS):
        source = None
    where = f"tables.{table}.columns.{spec_field_name}"
    for lo_key, hi_key in (("lower", "upper"), ("year_lower", "year_upper")):
        lo, hi = values[lo_key], values[hi_key]
        for key in (lo_key, hi_key):
            if values[key] is not None and not math.isfinite(float(values[key])):
                raise IngestError(f"invalid declaration: {where}: {key} must be finite")
        if lo is not None and hi is not None and float(lo) > float(hi):
            raise IngestError(f"invalid declaration: {where}: {lo_key} ({lo}) exceeds "
                              f"{hi_key} ({hi}) once the built-in defaults are applied; "
                              "declare both")
    if values["public_values"] is not None:
        try:
            values["public_values"] = normalise_public_values(values["public_values"],
                                                              duck_type)
        except ValueError as exc:
            raise IngestError(f"invalid declaration: {where}: public_values: {exc}") from None
    return ColumnMeta(name=spec_field_name, type=duck_type, nullable=not required,
                      dp_source=source, **values)


def max_rows_per_person(table: str, decl: Declaration) -> int:
    tdecl = _lookup(decl.tables, table)
    if tdecl is not None and tdecl.max_rows_per_person is not None:
        return tdecl.max_rows_per_person
    return DEFAULT_MAX_ROWS.get(table, DEFAULT_K)


def _fits(values: dict[str, Any], duck_type: str) -> bool:
    if "lower" in values or "upper" in values:
        return duck_type in NUMERIC_TYPES
    if "year_lower" in values:
        return duck_type in TEMPORAL_TYPES
    return True


def _lookup(mapping: dict[str, T], key: str) -> T | None:
    for name, value in mapping.items():
        if name.lower() == key:
            return value
    return None
