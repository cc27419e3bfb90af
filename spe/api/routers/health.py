"""Liveness, readiness and version."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy import text

import spe
from spe.api.state import get_db
from spe.db import Database

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    database: str


class Version(BaseModel):
    version: str
    api: str = "v1"


@router.get("/healthz", response_model=Health, summary="Liveness and database readiness")
def healthz(db: Database = Depends(get_db)) -> Health:
    with db.read() as session:
        session.execute(text("SELECT 1"))
    return Health(status="ok", database=db.engine.dialect.name)


@router.get("/v1/version", response_model=Version, summary="SPE version")
def version() -> Version:
    return Version(version=spe.__version__)
