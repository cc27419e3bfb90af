"""The OMOP CDM 5.4 field-level specification, as typed objects.

The bundled ``omop/cdm54_fields.csv`` is a column subset of the official
``OMOP_CDMv5.4_Field_Level.csv`` (same rows, same order). Contract:

* ``load_spec()`` returns every CDM table by lower-case name, each with its fields in the
  official order;
* ``FieldSpec.duckdb_type`` maps the CDM datatype to a DuckDB type: ``integer`` -> ``BIGINT``,
  ``float`` -> ``DOUBLE``, ``date`` -> ``DATE``, ``datetime`` -> ``TIMESTAMP``,
  ``varchar(n)`` / ``varchar(MAX)`` -> ``VARCHAR``; anything else is an error at load time;
* ``FieldSpec.required`` is the CDM ``isRequired`` flag (the column must be present in an
  export and may not hold NULL).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SPEC_FILE = Path(__file__).resolve().parent / "omop" / "cdm54_fields.csv"
CDM_VERSION = "5.4"

_VARCHAR = re.compile(r"^varchar\((\d+|max)\)$")
_SIMPLE_TYPES = {
    "integer": "BIGINT",
    "float": "DOUBLE",
    "date": "DATE",
    "datetime": "TIMESTAMP",
}
#: DuckDB types the spec maps to; the DP engine may rely on this closed set.
DUCKDB_TYPES = frozenset({"BIGINT", "DOUBLE", "DATE", "TIMESTAMP", "VARCHAR"})
NUMERIC_TYPES = frozenset({"BIGINT", "DOUBLE"})
TEMPORAL_TYPES = frozenset({"DATE", "TIMESTAMP"})


def duckdb_type(cdm_datatype: str) -> str:
    """DuckDB type of a CDM datatype (case-insensitive); ``ValueError`` if unknown."""
    key = cdm_datatype.strip().lower()
    if key in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[key]
    if _VARCHAR.match(key):
        return "VARCHAR"
    raise ValueError(f"unknown OMOP CDM datatype {cdm_datatype!r}")


@dataclass(frozen=True)
class FieldSpec:
    """One CDM field (column)."""

    name: str
    cdm_datatype: str
    duckdb_type: str
    required: bool
    primary_key: bool
    fk_table: str | None
    fk_field: str | None

    @property
    def max_length(self) -> int | None:
        """Declared varchar length, None for other types and ``varchar(MAX)``."""
        match = _VARCHAR.match(self.cdm_datatype.lower())
        if match and match.group(1) != "max":
            return int(match.group(1))
        return None


@dataclass(frozen=True)
class TableSpec:
    """One CDM table: its fields in official order."""

    name: str
    fields: tuple[FieldSpec, ...]

    @property
    def column_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def required_columns(self) -> list[str]:
        return [f.name for f in self.fields if f.required]

    @property
    def primary_key(self) -> list[str]:
        return [f.name for f in self.fields if f.primary_key]

    @property
    def has_person_id(self) -> bool:
        return any(f.name == "person_id" for f in self.fields)

    def field(self, name: str) -> FieldSpec | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def duckdb_columns(self) -> dict[str, str]:
        """Column name -> DuckDB type, in official order."""
        return {f.name: f.duckdb_type for f in self.fields}


def _none_if_na(value: str) -> str | None:
    value = value.strip()
    return None if value in ("", "NA") else value.lower()


def parse_spec(path: Path) -> dict[str, TableSpec]:
    """Parse a spec CSV with the bundled file's columns (see module docstring)."""
    fields: dict[str, list[FieldSpec]] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            table = row["table"].strip().lower()
            fields.setdefault(table, []).append(
                FieldSpec(
                    # The official table quotes fields that are SQL keywords ('"offset"'):
                    # exports name them plainly, and so do we.
                    name=row["field"].strip().strip('"').strip().lower(),
                    cdm_datatype=row["datatype"].strip(),
                    duckdb_type=duckdb_type(row["datatype"]),
                    required=row["required"].strip().lower() == "yes",
                    primary_key=row["primary_key"].strip().lower() == "yes",
                    fk_table=_none_if_na(row["fk_table"]),
                    fk_field=_none_if_na(row["fk_field"]),
                )
            )
    return {name: TableSpec(name, tuple(cols)) for name, cols in fields.items()}


@lru_cache(maxsize=1)
def load_spec() -> dict[str, TableSpec]:
    """All CDM 5.4 tables of the bundled spec, by lower-case table name."""
    return parse_spec(SPEC_FILE)


def table_spec(name: str) -> TableSpec:
    """The spec of one table (lower-case name); ``KeyError`` if it is not a CDM table."""
    return load_spec()[name.lower()]
