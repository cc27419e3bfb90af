"""Dataset metadata recorded at ingest: the contract between datasets and the DP engine.

The data holder declares per-column DP metadata (numeric bounds, public value sets) in a
``spe-metadata.yaml`` / ``.toml`` file beside the data; built-in defaults cover common OMOP
columns. The DP engine reads only this metadata (never the data) to plan a query and price it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

PRIVACY_UNIT = "person_id"
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


class TableMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    columns: list[ColumnMeta]
    row_count: int
    privacy_unit: str | None = Field(
        PRIVACY_UNIT, description="person column; None for public reference tables"
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

    def column(self, name: str) -> ColumnMeta | None:
        for col in self.columns:
            if col.name == name:
                return col
        return None


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
