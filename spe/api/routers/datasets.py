"""`GET /v1/datasets` and `GET /v1/datasets/{name}`: dataset metadata, never data values.

Readable by hospital admins, operators and access bodies (enforced by ``require_role``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from spe.api.routing import AuditedRoute
from spe.api.state import get_db
from spe.auth.deps import require_role
from spe.auth.principal import Principal, Role
from spe.datasets.ingest import NAME_PATTERN
from spe.datasets.metadata import ColumnMeta
from spe.datasets.registry import DatasetInfo, get_dataset, list_datasets
from spe.db import Database

router = APIRouter(tags=["datasets"], route_class=AuditedRoute)
_readers = require_role(Role.HOSPITAL_ADMIN, Role.OPERATOR, Role.ACCESS_BODY)


class DatasetSummary(BaseModel):
    name: str
    cdm_version: str
    privacy_unit: str
    source_format: str
    tables: list[str] = Field(description="table names, sorted")
    total_rows: int
    created_at: datetime
    created_by: str


class ColumnPublic(BaseModel):
    name: str
    type: str
    nullable: bool
    lower: float | None = None
    upper: float | None = None
    public_values: list[str | int] | None = None
    year_lower: int | None = None
    year_upper: int | None = None
    dp_source: str | None = None


class TablePublic(BaseModel):
    name: str
    row_count: int
    privacy_unit: str | None
    max_rows_per_person: int
    unique_key: list[str]
    columns: list[ColumnPublic]


class DatasetDetail(DatasetSummary):
    content_sha256: str
    max_groups_per_person: int
    table_details: list[TablePublic]


def _summary(info: DatasetInfo) -> dict[str, object]:
    meta = info.metadata
    return {"name": info.name, "cdm_version": meta.cdm_version,
            "privacy_unit": meta.privacy_unit, "source_format": meta.source_format,
            "tables": sorted(meta.tables), "total_rows": info.total_rows,
            "created_at": info.created_at, "created_by": info.created_by}


def _column(col: ColumnMeta) -> ColumnPublic:
    return ColumnPublic.model_validate(col.model_dump())


@router.get("/v1/datasets", response_model=list[DatasetSummary], name="dataset.list",
            operation_id="listDatasets", summary="List registered datasets (metadata only)",
            description="Hospital admins, operators and access bodies; others get 403.")
def datasets(db: Database = Depends(get_db),
             principal: Principal = Depends(_readers)) -> list[DatasetSummary]:
    return [DatasetSummary.model_validate(_summary(i)) for i in list_datasets(db)]


@router.get("/v1/datasets/{name}", response_model=DatasetDetail, name="dataset.read",
            operation_id="getDataset",
            summary="A dataset's tables, columns, types, row counts and DP metadata",
            description="Hospital admins, operators and access bodies; 404 for an unknown "
            "name.")
def dataset(name: Annotated[str, Path(pattern=NAME_PATTERN.pattern, max_length=63,
                                      description="The dataset's registered name.",
                                      examples=["omop_demo"])], db: Database = Depends(get_db),
            principal: Principal = Depends(_readers)) -> DatasetDetail:
    info = get_dataset(db, name)
    meta = info.metadata
    tables = [TablePublic(name=t.name, row_count=t.row_count, privacy_unit=t.privacy_unit,
                          max_rows_per_person=t.max_rows_per_person, unique_key=t.unique_key,
                          columns=[_column(c) for c in t.columns])
              for _, t in sorted(meta.tables.items())]
    return DatasetDetail.model_validate({
        **_summary(info), "content_sha256": meta.content_sha256,
        "max_groups_per_person": meta.max_groups_per_person, "table_details": tables})
