"""Engine evidence for tables (spe.airlock.contributions): a table exported with the SQL that
produced it is recomputed over the permit's real DuckDB dataset, compared cell by cell, and
checked per cell with ACRO's dominance (N-K 2/90 %) and p-percent (10 %) rules; on SQLite and
PostgreSQL (the ``db`` fixture). None of these files is released automatically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from permits.schemas import PermitCreate
from permits.service import PermitService
from spe.airlock.service import AirlockService
from spe.auth.principal import Principal, Role
from spe.config import Settings
from spe.datasets.metadata import ROW_RANK_COLUMN, ColumnMeta, DatasetMetadata, TableMeta
from spe.datasets.models import DatasetRecord
from spe.db import Database
from tests.integration.test_permit_service import ALPHA, NOW, body

ALICE = Principal(subject="al", username="alice", kind="user",
                  roles=frozenset({Role.RESEARCHER}))
ADMIN = Principal(subject="h", username="hadmin", kind="user",
                  roles=frozenset({Role.HOSPITAL_ADMIN}))

# Ward A: 20 persons paying 100 each (safe). Ward B: 12 persons, one paying 10,000 and 11
# paying 10 (dominated, and fails p-percent). Ward C: 3 persons (below the threshold).
VISITS = ([(i, "A", 100.0) for i in range(1, 21)]
          + [(100, "B", 10_000.0)] + [(100 + i, "B", 10.0) for i in range(1, 12)]
          + [(200 + i, "C", 50.0) for i in range(3)]
          + [(300, "D", 400.0), (301, "D", 400.0)] + [(302 + i, "D", 25.0) for i in range(8)])
# Ward D: 10 persons, the two largest hold 80 % (passes ACRO's k=90 %, fails a permit's 70 %).

SECRET_FIGURES = ("10000", "10110", "10010")  # B's total and top contributions


def _dataset(db: Database, settings: Settings) -> None:
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    path = settings.store_dir / "wards.duckdb"
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE visit (person_id BIGINT, ward VARCHAR, cost DOUBLE, "
                f"{ROW_RANK_COLUMN} INTEGER)")
    con.executemany("INSERT INTO visit VALUES (?, ?, ?, 1)", VISITS)
    con.close()
    cols = [ColumnMeta(name=n, type=t) for n, t in
            [("person_id", "BIGINT"), ("ward", "VARCHAR"), ("cost", "DOUBLE")]]
    meta = DatasetMetadata(name="wards", tables={"visit": TableMeta(
        name="visit", columns=cols, row_count=len(VISITS), row_rank_column=ROW_RANK_COLUMN)},
        source_format="csv", content_sha256="0" * 64)
    with db.write() as s:
        s.add(DatasetRecord(name="wards", store_file="wards.duckdb", created_by="test",
                            total_rows=len(VISITS), meta=meta.model_dump(mode="json"),
                            created_at=NOW))


def _permit(permits: PermitService, mode: str, **policy: Any) -> str:
    extra: dict[str, Any] = {"access_mode": mode}
    if mode == "pseudonymised":
        extra["pseudonymisation_justification"] = "tables by ward need row-level access"
    return permits.issue(ALPHA, PermitCreate.model_validate(body(
        datasets=[{"dataset": "wards", "tables": {"visit": ["person_id", "ward", "cost"]}}],
        reference=f"0002/2026/{mode[:2].upper()}{len(policy)}",
        export_policy={"allowed_kinds": ["csv", "parquet"], **policy}, **extra))).permit_id


@pytest.fixture
def setup(db: Database, tmp_path: Path) -> tuple[AirlockService, str, str]:
    settings = Settings(data_dir=tmp_path / "data", database_url=db.url)
    _dataset(db, settings)
    permits = PermitService(db)
    return (AirlockService(db, settings), _permit(permits, "pseudonymised"),
            _permit(permits, "dp_only"))


BY_WARD = "SELECT ward, COUNT(DISTINCT person_id) AS n, SUM(cost) AS total FROM visit " \
          "GROUP BY ward"


def _submit(airlock: AirlockService, pid: str, data: bytes, sql: str | None,
            name: str = "wards.csv") -> dict[str, Any]:
    evidence = [{"evidence": "query", "file": name, "sql": sql}] if sql is not None else []
    req = airlock.create(ALICE, pid, "cost by ward for the paper", evidence)
    airlock.upload(ALICE, pid, req["id"], name, data)
    return airlock.submit(ALICE, pid, req["id"])


def _checks(got: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in got["files"][0]["checks"]}


def test_matching_safe_table_passes_every_rule_but_still_goes_to_review(
        setup: tuple[AirlockService, str, str]) -> None:
    airlock, pid, _dp = setup
    got = _submit(airlock, pid, b"ward,n,total\nA,20,2000\n",
                  BY_WARD.replace("GROUP BY", "WHERE ward = 'A' GROUP BY"))
    checks = _checks(got)
    assert checks["query_match"]["outcome"] == "pass"
    for rule in ("persons_threshold", "dominance", "p_percent"):
        assert checks[rule]["outcome"] == "pass", checks[rule]
    assert got["state"] == "in_review" and got["files"][0]["outcome"] == "needs_review"


def test_dominated_cell_fails_dominance_and_p_percent_without_showing_figures(
        setup: tuple[AirlockService, str, str]) -> None:
    airlock, pid, _dp = setup
    got = _submit(airlock, pid, b"ward,n,total\nA,20,2000\nB,12,10110\n",
                  BY_WARD.replace("GROUP BY", "WHERE ward <> 'C' GROUP BY"))
    checks = _checks(got)
    assert checks["query_match"]["outcome"] == "pass"
    assert checks["dominance"]["outcome"] == "fail"
    assert checks["p_percent"]["outcome"] == "fail"
    assert checks["persons_threshold"]["outcome"] == "pass"
    cells = {tuple(c["key"]): c["fails"] for c in checks["dominance"]["details"]["cells"]}
    assert cells[("A",)] == [] and "dominance:total" in cells[("B",)]
    assert got["state"] == "in_review"  # reviewers see it; never released
    text = repr(got["files"][0]["checks"])
    assert not any(f in text for f in SECRET_FIGURES)  # the contributions stay data-side


def test_small_group_fails_the_persons_threshold(
        setup: tuple[AirlockService, str, str]) -> None:
    airlock, pid, _dp = setup
    got = _submit(airlock, pid, b"ward,n,total\nA,20,2000\nC,3,150\n",
                  BY_WARD.replace("GROUP BY", "WHERE ward <> 'B' GROUP BY"))
    assert _checks(got)["persons_threshold"]["outcome"] == "fail"
    assert got["files"][0]["outcome"] != "pass"


def test_suppressed_cell_is_allowed(setup: tuple[AirlockService, str, str]) -> None:
    airlock, pid, _dp = setup
    got = _submit(airlock, pid, b"ward,n,total\nA,20,2000\nB,12,\nC,,\n", BY_WARD)
    checks = _checks(got)
    assert checks["query_match"]["outcome"] == "pass"
    assert checks["dominance"]["outcome"] == "pass"  # B's sum was suppressed
    assert checks["persons_threshold"]["outcome"] == "pass"  # C (3 persons) is not shown


@pytest.mark.parametrize("table", [b"ward,n,total\nA,21,2000\n",       # one person added
                                   b"ward,n,total\nA,20,2001\n",       # total nudged
                                   b"ward,n,total\nA,20,2000\nZ,20,2000\n",  # invented group
                                   b"ward,count,total\nA,20,2000\n"])  # renamed column
def test_table_that_does_not_match_its_query_fails(
        setup: tuple[AirlockService, str, str], table: bytes) -> None:
    airlock, pid, _dp = setup
    got = _submit(airlock, pid, table,
                  BY_WARD.replace("GROUP BY", "WHERE ward = 'A' GROUP BY"))
    check = _checks(got)["query_match"]
    assert check["outcome"] == "fail" and check["blocking"]
    assert "does not match its query" in check["reason"]
    assert got["state"] == "returned_for_changes"


def test_table_without_evidence_keeps_threshold_checks_and_review(
        setup: tuple[AirlockService, str, str]) -> None:
    airlock, pid, _dp = setup
    got = _submit(airlock, pid, b"ward,n,total\nA,20,2000\nB,12,10110\n", None)
    checks = _checks(got)
    assert "query_match" not in checks
    assert checks["dominance"]["outcome"] == "needs_review"
    assert got["state"] == "in_review"


@pytest.mark.parametrize("sql", [
    "SELECT ward, COUNT(*) AS n, SUM(cost) AS total FROM visit v JOIN visit w "
    "ON v.person_id = w.person_id GROUP BY ward",                       # a join
    "SELECT ward, COUNT(*) AS n, AVG(cost) AS total FROM visit GROUP BY ward",  # AVG
    "SELECT ward, COUNT(*) AS n, SUM(secret) AS total FROM visit GROUP BY ward",  # not granted
    "SELECT ward, COUNT(*) AS n FROM nowhere GROUP BY ward",              # unknown table
    "DROP TABLE visit",                                                   # not a SELECT
    # person ids: real in the store, pseudonyms in the extract; a match would be an oracle
    "SELECT ward, COUNT(*) AS n FROM visit WHERE person_id < 5 GROUP BY ward",
    "SELECT person_id, COUNT(*) AS n FROM visit GROUP BY person_id",
    "SELECT ward, SUM(person_id) AS n FROM visit GROUP BY ward",
    # per-person derived tables (the DP engine accepts them; the airlock does not recompute)
    "WITH visit2 AS (SELECT person_id, COUNT(*) AS k FROM visit GROUP BY person_id) "
    "SELECT COUNT(*) AS n FROM visit2",
    "SELECT COUNT(*) AS n FROM (SELECT person_id, COUNT(*) AS k FROM visit "
    "GROUP BY person_id) f",
])
def test_query_outside_what_is_recomputed_goes_to_review(
        setup: tuple[AirlockService, str, str], sql: str) -> None:
    airlock, pid, _dp = setup
    got = _submit(airlock, pid, b"ward,n,total\nA,20,2000\n", sql)
    checks = _checks(got)
    assert checks["query_evidence"]["outcome"] == "needs_review"
    assert "query_match" not in checks and got["state"] == "in_review"


def test_dp_only_permit_does_not_recompute(setup: tuple[AirlockService, str, str]) -> None:
    airlock, _pid, dp_only = setup
    got = _submit(airlock, dp_only, b"ward,n,total\nA,20,2000\n", BY_WARD)
    checks = _checks(got)
    assert checks["query_evidence"]["outcome"] == "needs_review"
    assert "DP-only" in checks["query_evidence"]["reason"]


def test_permit_tightens_dominance(setup: tuple[AirlockService, str, str], db: Database) -> None:
    airlock, pid, _dp = setup
    ward_d = BY_WARD.replace("GROUP BY", "WHERE ward = 'D' GROUP BY")
    table = b"ward,n,total\nD,10,1000\n"
    assert _checks(_submit(airlock, pid, table, ward_d))["dominance"]["outcome"] == "pass"
    strict = _permit(PermitService(db), "pseudonymised", dominance_k=0.7, p_percent=0.6)
    checks = _checks(_submit(airlock, strict, table, ward_d))
    assert checks["dominance"]["outcome"] == "fail" and "70%" in checks["dominance"]["reason"]
    assert checks["p_percent"]["outcome"] == "fail"


def test_permit_cannot_loosen_acro_defaults() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        PermitCreate.model_validate(body(export_policy={"dominance_k": 0.95}))
    with pytest.raises(ValidationError):
        PermitCreate.model_validate(body(export_policy={"p_percent": 0.05}))


@pytest.mark.keycloak
def test_evidence_travels_through_the_api(api_client: Any, user_headers: Any,
                                          api_settings: Settings, db: Database) -> None:
    """The researcher attaches the query in the request body; the reviewer and the researcher
    both read the verdicts, and no recomputed figure is in either answer."""
    _dataset(db, api_settings)
    pid = _permit(PermitService(db), "pseudonymised")
    alice, admin = user_headers("alice"), user_headers("hadmin")
    base = f"/v1/permits/{pid}/exports"
    sql = BY_WARD.replace("GROUP BY", "WHERE ward <> 'C' GROUP BY")
    r = api_client.post(base, json={"justification": "cost by ward for the paper", "receipts": [
        {"evidence": "query", "file": "wards.csv", "sql": sql}]}, headers=alice)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    r = api_client.post(f"{base}/{rid}/files?name=wards.csv",
                        content=b"ward,n,total\nA,20,2000\nB,12,10110\nD,10,1000\n",
                        headers={**alice, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    mine = api_client.post(f"{base}/{rid}/submit", headers=alice)
    assert mine.status_code == 200 and mine.json()["state"] == "in_review"
    theirs = api_client.get(f"{base}/{rid}", headers=admin)
    assert theirs.status_code == 200
    checks = {c["name"]: c for c in theirs.json()["files"][0]["checks"]}
    assert checks["dominance"]["outcome"] == "fail"
    cells = {tuple(c["key"]): c["fails"] for c in checks["dominance"]["details"]["cells"]}
    assert cells[("D",)] == [] and "p_percent:total" in cells[("B",)]
    for answer in (mine.text, theirs.text):
        assert not any(f in answer for f in SECRET_FIGURES)
