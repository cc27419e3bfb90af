"""The airlock service without the API, on SQLite and PostgreSQL: a permit suspended where
this process saw no event still has its open requests closed before anyone reads them, and
the disguised files of the issue are never released automatically."""

from __future__ import annotations

import base64
import io
import pickle
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from permits.schemas import PermitCreate
from permits.service import PermitService
from permits.states import Action
from spe.airlock.service import AirlockService
from spe.audit import verify_chain
from spe.auth.principal import Principal, Role
from spe.config import Settings
from spe.db import Database
from spe.dp import receipt
from tests.integration.test_permit_service import ALPHA, body, register_dataset

ALICE = Principal(subject="al", username="alice", kind="user",
                  roles=frozenset({Role.RESEARCHER}))
ADMIN = Principal(subject="h", username="hadmin", kind="user",
                  roles=frozenset({Role.HOSPITAL_ADMIN}))


@pytest.fixture
def setup(db: Database, tmp_path: Path) -> tuple[PermitService, AirlockService, str]:
    register_dataset(db)
    permits = PermitService(db)
    pid = permits.issue(ALPHA, PermitCreate.model_validate(body(export_policy={
        "allowed_kinds": ["csv", "parquet", "png", "txt"]}))).permit_id
    settings = Settings(data_dir=tmp_path / "data", database_url=db.url)
    return permits, AirlockService(db, settings), pid


def _zip_b64() -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("rows.csv", "person_id,birth\n1,1970-01-01\n")
    return base64.b64encode(buf.getvalue()).decode()


def _parquet() -> bytes:
    buf = io.BytesIO()
    pd.DataFrame({"group": ["a", "b"], "n": [40, 50]}).to_parquet(buf)
    return buf.getvalue()


def test_suspended_elsewhere_closes_on_read(setup: tuple[PermitService, AirlockService, str]
                                            ) -> None:
    permits, airlock, pid = setup
    req = airlock.create(ALICE, pid, "aggregates for the paper", [])
    airlock.upload(ALICE, pid, req["id"], "t.csv", b"sex,n\nF,120\nM,130\n")
    assert airlock.submit(ALICE, pid, req["id"])["state"] == "in_review"
    permits.transition(ALPHA, pid, Action.REVOKE, reason="misuse found by the access body")
    got = airlock.get(ADMIN, pid, req["id"])
    assert got["state"] == "rejected" and "revoked" in got["reason"]
    assert airlock.close_ended() == 0


@pytest.mark.parametrize("name", ["csv_named_png", "parquet_named_csv", "zip_in_csv_column",
                                  "small_count_hidden", "pickle_named_pt",
                                  "dp_answer_changed", "identifier_column"])
def test_disguised_files_are_never_released_automatically(
        setup: tuple[PermitService, AirlockService, str], db: Database, name: str) -> None:
    _permits, airlock, pid = setup
    secret = airlock.settings.secret_key.get_secret_value()
    table = pd.DataFrame({"sex": ["F", "M"], "n": [120.2, 130.7]})
    csv, parquet = receipt.output_bytes(table)
    signed = receipt.sign(secret, permit_id=pid, charge_id="c", dataset="demo", csv=csv,
                          parquet=parquet, epsilon=0.3, delta=0.0,
                          issued_at="2026-12-05T10:00:00", rows=2, columns=["sex", "n"])
    big = "\n".join(f"g{i},{100 + i}" for i in range(30))
    files = {
        "csv_named_png": ("figure.png", b"sex,n\nF,120\nM,130\n"),
        "parquet_named_csv": ("table.csv", _parquet()),
        "zip_in_csv_column": ("t.csv", f"g,n,blob\na,40,{_zip_b64()}\n".encode()),
        "small_count_hidden": ("t.csv", f"group,n\n{big}\nhidden,2\n".encode()),
        "pickle_named_pt": ("model.pt", pickle.dumps({"w": [0.1, 0.2]})),
        "dp_answer_changed": ("answer.csv", csv.replace(b"120.2", b"120.3")),
        "identifier_column": ("t.csv", b"person_id,n\n17,40\n18,50\n"),
    }
    fname, data = files[name]
    req = airlock.create(ALICE, pid, "please release this result", [signed])
    airlock.upload(ALICE, pid, req["id"], fname, data)
    got = airlock.submit(ALICE, pid, req["id"])
    assert got["state"] in ("in_review", "returned_for_changes"), got["state"]
    assert got["files"][0]["outcome"] != "pass"
    with db.read() as s:
        assert verify_chain(s).ok


def test_follower_reads_the_outbox_after_its_cursor(
        setup: tuple[PermitService, AirlockService, str], tmp_path: Path) -> None:
    from spe.airlock.follower import EventFollower

    permits, airlock, pid = setup
    follower = EventFollower(airlock, tmp_path / "cursor")
    assert follower.run_once() >= 1          # the issue event; nothing to close
    req = airlock.create(ALICE, pid, "aggregates for the paper", [])
    permits.transition(ALPHA, pid, Action.SUSPEND, reason="investigation by the body")
    assert follower.run_once() == 1          # no subscriber in this process saw it
    from spe.airlock.models import ExportRequest

    with airlock.db.read() as s:
        row = s.get(ExportRequest, req["id"])
        assert row is not None and row.state == "rejected"
    assert follower.run_once() == 0          # the cursor survived
    assert EventFollower(airlock, tmp_path / "cursor").run_once() == 0
