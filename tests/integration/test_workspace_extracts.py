"""Pseudonymised per-permit extracts: permitted columns only, keyed pseudonyms consistent
within a permit and different across permits, rebuilt on amendment, none for dp_only, and the
key unreadable from inside the permit's own sandbox."""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from permits.terms import (
    AccessMode,
    ComputeQuota,
    DatasetGrant,
    PermitStatus,
    PermitTerms,
    PrivacyBudget,
)
from spe.db import Database
from workspaces.extracts import build_extract, key_path, pseudonym, pseudonym_key
from workspaces.sandbox import EXTRACT_MOUNT, Workspace
from workspaces.settings import WorkspaceSettings


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "omop.duckdb"
    path.parent.mkdir()
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE person (person_id BIGINT, year_of_birth INT, name VARCHAR)")
    con.execute("INSERT INTO person VALUES (1, 1950, 'Ann'), (2, 1960, 'Bo'), (3, 1970, 'Cy')")
    con.execute("CREATE TABLE condition_occurrence (person_id BIGINT, concept INT, note VARCHAR)")
    con.execute("INSERT INTO condition_occurrence VALUES (1, 10, 'x'), (1, 11, 'y'), (3, 12, 'z')")
    con.close()
    return path


def terms(permit_id: str, mode: AccessMode = AccessMode.PSEUDONYMISED, version: int = 1,
          person_cols: frozenset[str] = frozenset({"person_id", "year_of_birth"})) -> PermitTerms:
    now = datetime.now(UTC)
    return PermitTerms(
        permit_id=permit_id, version=version, access_body="hdab", status=PermitStatus.ACTIVE,
        valid_from=now, valid_until=now + timedelta(days=30), persons=frozenset({"alice"}),
        access_mode=mode,
        datasets=(DatasetGrant("omop", {"person": person_cols,
                                        "condition_occurrence": frozenset({"person_id",
                                                                           "concept"})}),),
        budget=PrivacyBudget(epsilon=1.0, delta=1e-6, max_epsilon_per_query=0.5))


def test_extract_pseudonymises_consistently_per_permit(sqlite_db: Database, dataset: Path,
                                                       tmp_path: Path) -> None:
    out, keys = tmp_path / "extracts", tmp_path / "keys"
    p1 = build_extract(terms("P-1"), {"omop": dataset}, out, keys, db=sqlite_db)
    p2 = build_extract(terms("P-2"), {"omop": dataset}, out, keys)
    assert p1 is not None and p2 is not None
    person1 = pq.read_table(p1 / "omop" / "person.parquet").to_pydict()
    cond1 = pq.read_table(p1 / "omop" / "condition_occurrence.parquet").to_pydict()
    person2 = pq.read_table(p2 / "omop" / "person.parquet").to_pydict()
    assert set(person1) == {"person_id", "year_of_birth"}  # no name: not permitted
    assert set(cond1) == {"person_id", "concept"}
    assert not {1, 2, 3, "1", "2", "3"} & set(person1["person_id"])
    key1 = pseudonym_key(keys, "P-1")
    assert sorted(person1["person_id"]) == sorted(pseudonym(key1, i) for i in (1, 2, 3))
    # the same person has the same pseudonym in every table of the permit
    assert cond1["person_id"].count(pseudonym(key1, 1)) == 2
    assert set(cond1["person_id"]) <= set(person1["person_id"])
    # and a different one under another permit
    assert not set(person1["person_id"]) & set(person2["person_id"])
    assert oct(key_path(keys, "P-1").stat().st_mode & 0o777) == "0o600"
    assert oct((p1 / "omop" / "person.parquet").stat().st_mode & 0o777) == "0o444"


def test_rebuilt_on_amendment_and_none_for_dp_only(dataset: Path, tmp_path: Path) -> None:
    out, keys = tmp_path / "extracts", tmp_path / "keys"
    first = build_extract(terms("P-1"), {"omop": dataset}, out, keys)
    assert first is not None
    before = pq.read_table(first / "omop" / "person.parquet").to_pydict()
    amended = terms("P-1", version=2, person_cols=frozenset({"person_id"}))
    again = build_extract(amended, {"omop": dataset}, out, keys)
    assert again == first
    after = pq.read_table(first / "omop" / "person.parquet").to_pydict()
    assert set(after) == {"person_id"} and sorted(after["person_id"]) == sorted(
        before["person_id"])
    assert build_extract(terms("P-1", AccessMode.DP_ONLY, 3), {"omop": dataset}, out,
                         keys) is None
    assert not first.exists()
    assert build_extract(terms("P-9", AccessMode.DP_ONLY), {"omop": dataset}, out, keys) is None


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("bwrap"),
                    reason="the sandbox needs root and bubblewrap")
def test_extract_readable_but_key_and_store_not_inside_sandbox(dataset: Path,
                                                               tmp_path: Path) -> None:
    out, keys = tmp_path / "var" / "extracts", tmp_path / "var" / "keys"
    extract = build_extract(terms("P-1"), {"omop": dataset}, out, keys)
    assert extract is not None
    key_file = key_path(keys, "P-1")
    ws = Workspace.provision(
        workspaces_dir=tmp_path / "var" / "workspaces", person="alice", permit_id="P-1",
        quota=ComputeQuota(memory_mb=256), with_network=False, extract=extract,
        settings=WorkspaceSettings(runtime_dir=tmp_path / "none",
                                   cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}"),
        ws_id=f"t{uuid.uuid4().hex[:11]}")
    try:
        assert key_file.read_bytes() and dataset.read_bytes()  # readable outside
        for path in (key_file, dataset, extract / "manifest.json"):
            # host paths are invisible inside
            assert ws.run(["cat", str(path)]).returncode != 0, path
        assert ws.run(["cat", f"{EXTRACT_MOUNT}/manifest.json"]).returncode == 0
        assert ws.run(["ls", f"{EXTRACT_MOUNT}/omop"]).stdout.split() == [
            "condition_occurrence.parquet", "person.parquet"]
        assert ws.run(["touch", f"{EXTRACT_MOUNT}/omop/x"]).returncode != 0
        found = ws.run(["sh", "-c", "find / -xdev -name '*.key' 2>/dev/null; "
                        "find /home /tmp /data -name '*.key' 2>/dev/null"])
        assert found.stdout.strip() == ""
    finally:
        ws.destroy(remove_home=True)
