"""XLSX through the airlock service on SQLite and PostgreSQL: a plain workbook named .csv is
checked as tables and waits for reviewers; a macro-carrying one named .xlsx is returned."""

from __future__ import annotations

from pathlib import Path

import pytest

from permits.schemas import PermitCreate
from permits.service import PermitService
from spe.airlock.service import AirlockService
from spe.auth.principal import Principal, Role
from spe.config import Settings
from spe.db import Database
from tests.integration.test_permit_service import ALPHA, body, register_dataset
from tests.unit.test_airlock_xlsx import PLAIN, altered

ALICE = Principal(subject="al", username="alice", kind="user",
                  roles=frozenset({Role.RESEARCHER}))


@pytest.fixture
def airlock(db: Database, tmp_path: Path) -> tuple[AirlockService, str]:
    register_dataset(db)
    pid = PermitService(db).issue(ALPHA, PermitCreate.model_validate(body(export_policy={
        "allowed_kinds": ["csv", "xlsx"]}))).permit_id
    return AirlockService(db, Settings(data_dir=tmp_path / "d", database_url=db.url)), pid


def test_workbooks_by_content(airlock: tuple[AirlockService, str]) -> None:
    svc, pid = airlock
    req = svc.create(ALICE, pid, "Table 2 as a workbook", [])
    svc.upload(ALICE, pid, req["id"], "table.csv", PLAIN)
    got = svc.submit(ALICE, pid, req["id"])
    assert got["state"] == "in_review" and got["files"][0]["kind"] == "xlsx"
    sheets = {c["details"].get("sheet") for c in got["files"][0]["checks"]
              if c["name"] == "cell_counts"}
    assert sheets == {"by sex", "by region"}

    req = svc.create(ALICE, pid, "Table 3 as a workbook", [])
    macro = altered(PLAIN, {"xl/vbaProject.bin": b"\xd0\xcf\x11\xe0" + b"\x00" * 64})
    svc.upload(ALICE, pid, req["id"], "table.xlsx", macro)
    got = svc.submit(ALICE, pid, req["id"])
    assert got["state"] == "returned_for_changes"
    assert got["files"][0]["checks"][0]["outcome"] == "fail"
    assert "macros" in got["files"][0]["checks"][0]["reason"]
