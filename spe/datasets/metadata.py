"""Dataset metadata recorded at ingest: the contract between datasets and the DP engine.

The data holder declares per-column DP metadata (numeric bounds, public value sets) in a
``spe-metadata.yaml`` / ``.toml`` file beside the data; built-in defaults cover common OMOP
columns. The DP engine reads only this metadata (never the data) to plan a query and price it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PRIVACY_UNIT = "person_id"
#: Hidden column added at ingest to every *linked* table: the person its row belongs to, found
#: through the table's declared foreign-key path. Never listed in columns, never grantable.
LINKED_PERSON_COLUMN = "_spe_person_id"

#: What a table is to the DP engine (see :class:`TableMeta`).
TableKind = Literal["person", "linked", "public", "refused"]

#: Tables that hold no data about persons unless the data holder says otherwise: the OMOP
#: standardised vocabularies and the CDM's own source description.
DEFAULT_PUBLIC_TABLES = frozenset({
    "concept", "concept_ancestor", "concept_class", "concept_relationship", "concept_synonym",
    "domain", "drug_strength", "relationship", "vocabulary", "source_to_concept_map",
    "cdm_source", "metadata",
})
#: Column added at ingest to every person-level table: a uniformly random rank of the row among
#: the person's rows (1..n), so "at most k rows per person" becomes the filter ``rank <= k``.
ROW_RANK_COLUMN = "_spe_row_rank"


class ColumnMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: str = Field(description="DuckDB type, e.g. BIGINT, DOUBLE, DATE, TIMESTAMP, VARCHAR")
    nullable: bool = True
    lower: float | None = Field(None, description="declared lower bound for clamping")
    upper: float | None = Field(None, description="declared upper bound for clamping")
    public_values: list[str | int] | None = Field(
        None, description="declared public value set: group keys released in full"
    )
    year_lower: int | None = Field(
        None, description="DATE/TIMESTAMP columns: first calendar year of the declared range"
    )
    year_upper: int | None = Field(
        None, description="DATE/TIMESTAMP columns: last calendar year of the declared range "
        "(the years year_lower..year_upper are public group keys)"
    )
    dp_source: str | None = Field(
        None, description="where the DP metadata came from: 'default' (built in), "
        "'declared' (the data holder's spe-metadata file) or None (nothing declared)"
    )


class LinkHop(BaseModel):
    """One way a linked table's row reaches its person: ``column`` equals the parent's unique
    ``parent_column``; when ``when_column`` is set, the hop applies only to rows whose
    ``when_column`` equals ``when_value`` (OMOP ``cost``: ``cost_domain_id`` names the event
    table). The parent is a per-person or an (earlier resolved) linked table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str
    table: str
    parent_column: str
    when_column: str | None = None
    when_value: str | None = None

    def describe(self) -> str:
        cond = (f" where {self.when_column} = {self.when_value!r}"
                if self.when_column is not None else "")
        return f"{self.column} -> {self.table}.{self.parent_column}{cond}"


class TableMeta(BaseModel):
    """A table as the DP engine sees it. Every table is exactly one ``kind``:

    * ``person``: carries the privacy unit (``person_id``); ranked per person at ingest;
    * ``linked``: reaches exactly one person through ``link`` (alternative hops, at most one
      applies to a row), resolved at ingest into the hidden ``LINKED_PERSON_COLUMN`` and
      ranked per person like a per-person table; a row that does not resolve is an ingest
      error;
    * ``public``: reference data the data holder declared public (the OMOP vocabularies by
      default); joined to person-level tables on its unique key only;
    * ``refused``: anything else; stored but never read by a query, which is refused with
      ``refusal`` (what declaration would allow it).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    columns: list[ColumnMeta]
    row_count: int
    kind: TableKind = "person"
    link: list[LinkHop] = Field(
        default_factory=list, description="linked tables: the hops to their person")
    refusal: str | None = Field(
        None, description="refused tables: why, and the declaration that would allow them")
    privacy_unit: str | None = Field(
        PRIVACY_UNIT, description="the column holding the row's person: person_id for "
        "per-person tables, LINKED_PERSON_COLUMN for linked tables, None otherwise"
    )
    max_rows_per_person: int = Field(
        10, ge=1, description="default k: rows one person contributes per group"
    )
    unique_key: list[str] = Field(
        default_factory=list, description="key checked unique at ingest (reference tables)"
    )
    row_rank_column: str | None = Field(
        None, description="ROW_RANK_COLUMN when the table has one (person-level tables); "
        "it is not listed in columns and must never be released"
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_of_older_records(cls, data: Any) -> Any:
        """Metadata recorded before kinds existed: a table without a privacy unit is public
        only if it is on the default public list, and refused otherwise (never guessed)."""
        if isinstance(data, dict) and "kind" not in data:
            data = dict(data)
            if data.get("privacy_unit", PRIVACY_UNIT) is not None:
                data["kind"] = "person"
            elif data.get("name") in DEFAULT_PUBLIC_TABLES:
                data["kind"] = "public"
            else:
                data["kind"] = "refused"
                data["refusal"] = refusal_text(str(data.get("name")))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TableMeta:
        if self.kind == "person" and self.privacy_unit != PRIVACY_UNIT:
            raise ValueError(f"per-person table {self.name} must have privacy unit "
                             f"{PRIVACY_UNIT}")
        if self.kind == "linked" and (self.privacy_unit != LINKED_PERSON_COLUMN
                                      or not self.link):
            raise ValueError(f"linked table {self.name} needs a link and the privacy unit "
                             f"{LINKED_PERSON_COLUMN}")
        if self.kind in ("public", "refused") and self.privacy_unit is not None:
            raise ValueError(f"{self.kind} table {self.name} has no privacy unit")
        return self

    @property
    def person_level(self) -> bool:
        """Rows belong to a person (per-person or linked): bounded per person."""
        return self.kind in ("person", "linked")

    def describe_kind(self) -> str:
        if self.kind == "person":
            return f"per-person ({PRIVACY_UNIT})"
        if self.kind == "linked":
            return "linked to a person via " + " | ".join(h.describe() for h in self.link)
        if self.kind == "public":
            return "public reference data"
        return "refused in queries: " + (self.refusal or refusal_text(self.name))

    def column(self, name: str) -> ColumnMeta | None:
        for col in self.columns:
            if col.name == name:
                return col
        return None


def refusal_text(table: str) -> str:
    return (f"the table {table!r} has no declared privacy-unit kind (it is neither per-person, "
            "linked to a person, nor declared public); the data holder can declare it in "
            f"spe-metadata.yaml as `tables: {{{table}: {{kind: public}}}}` if it holds no "
            "data about persons, or link it to a person with `kind: linked` and a `link`")


class DatasetMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    cdm_version: str = "5.4"
    privacy_unit: str = PRIVACY_UNIT
    max_groups_per_person: int = Field(
        1, ge=1, description="default m: groups one person may contribute to"
    )
    tables: dict[str, TableMeta]
    source_format: str = Field(description="csv, tsv, parquet, or mixed (several kinds)")
    content_sha256: str = Field(description="hash over the ingested source files")
