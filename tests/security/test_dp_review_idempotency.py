"""An idempotency key replays one answer only for the exact request that produced it.

The stored answer was computed under one (SQL, epsilon, delta, bounds, dataset) and for one
researcher. Replaying it for another epsilon or bounds would hand back an answer whose accuracy
and cost the caller did not ask for; replaying it to another researcher of the permit would
release to that person an answer that was never charged to them (per-person caps).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spe.config import Settings
from spe.db import Database
from spe.dp.service import Caller, QueryRequest, run_query
from spe.dp.testing import make_dataset, make_terms
from spe.errors import Conflict

SQL = "SELECT COUNT(*) FROM measurement"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = Path(tmp_path_factory.mktemp("idem"))
    meta = make_dataset(base / "d.duckdb", persons=100)
    return meta, base / "d.duckdb", Settings(data_dir=base / "v")


@pytest.mark.parametrize("change", [
    {"epsilon": 0.6}, {"max_rows_per_person": 1}, {"delta": 1e-7},
])
def test_same_key_other_parameters_conflict(db: Database, dataset, change) -> None:  # type: ignore[no-untyped-def]
    meta, path, settings = dataset
    terms = make_terms(meta, persons=frozenset({"alice"}))
    first = run_query(db, settings, terms, Caller(actor="alice"),
                      QueryRequest(sql=SQL, epsilon=0.3, idempotency_key="k1"),
                      lambda _n: (meta, path))
    again = run_query(db, settings, terms, Caller(actor="alice"),
                      QueryRequest(sql=SQL, epsilon=0.3, idempotency_key="k1"),
                      lambda _n: (meta, path))
    assert again["replayed"] and again["rows"] == first["rows"]
    req = QueryRequest(**{"sql": SQL, "epsilon": 0.3, "idempotency_key": "k1", **change})
    with pytest.raises(Conflict):
        run_query(db, settings, terms, Caller(actor="alice"), req, lambda _n: (meta, path))


def test_same_key_other_researcher_conflict(db: Database, dataset) -> None:  # type: ignore[no-untyped-def]
    meta, path, settings = dataset
    terms = make_terms(meta, persons=frozenset({"alice", "bob"}), per_person_epsilon=0.5)
    run_query(db, settings, terms, Caller(actor="alice"),
              QueryRequest(sql=SQL, epsilon=0.3, idempotency_key="k2"), lambda _n: (meta, path))
    with pytest.raises(Conflict):
        run_query(db, settings, terms, Caller(actor="bob"),
                  QueryRequest(sql=SQL, epsilon=0.3, idempotency_key="k2"),
                  lambda _n: (meta, path))
