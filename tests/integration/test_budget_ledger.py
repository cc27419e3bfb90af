"""Budget ledger: exact accounting under concurrency and crashes, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spe.audit import verify_chain
from spe.budget import ledger
from spe.config import Settings
from spe.datasets.metadata import DatasetMetadata
from spe.db import Database
from spe.dp import receipt
from spe.dp.service import Caller, QueryFailed, QueryRequest, run_query
from spe.dp.testing import make_dataset, make_terms
from spe.errors import BudgetExceeded, Conflict

SQL = "SELECT gender_concept_id, COUNT(*) FROM person GROUP BY 1"


@pytest.fixture
def ds(tmp_path: Path) -> tuple[DatasetMetadata, Path]:
    path = tmp_path / "d.duckdb"
    return make_dataset(path, persons=300), path


def _worker(db_url: str, path: str, meta_json: str, data_dir: str, n: int) -> tuple[int, int]:
    meta = DatasetMetadata.model_validate_json(meta_json)
    db = Database(db_url)
    settings = Settings(data_dir=Path(data_dir), database_url=db_url)
    terms = make_terms(meta, epsilon=1.0, max_epsilon_per_query=1.0)
    ok = refused = 0

    def one(i: int) -> str:
        try:
            run_query(db, settings, terms, Caller(actor="alice"),
                      QueryRequest(sql=SQL, epsilon=0.1), lambda _n: (meta, Path(path)))
            return "ok"
        except BudgetExceeded:
            return "refused"

    with ThreadPoolExecutor(max_workers=8) as pool:
        for outcome in pool.map(one, range(n)):
            ok += outcome == "ok"
            refused += outcome == "refused"
    db.dispose()
    return ok, refused


def test_200_concurrent_queries_release_exactly_10(db: Database, db_url: str, ds, tmp_path: Path
                                                   ) -> None:  # type: ignore[no-untyped-def]
    meta, path = ds
    ctx = mp.get_context("spawn")
    args = (db_url, str(path), meta.model_dump_json(), str(tmp_path / "var"), 50)
    with ctx.Pool(4) as pool:
        results = pool.starmap(_worker, [args] * 4)
    ok = sum(r[0] for r in results)
    refused = sum(r[1] for r in results)
    assert (ok, refused) == (10, 190)
    terms = make_terms(meta, epsilon=1.0, max_epsilon_per_query=1.0)
    with db.read() as session:
        snap = ledger.snapshot(session, terms)
        assert snap.epsilon_spent == pytest.approx(1.0, abs=1e-12)
        assert snap.epsilon_spent <= 1.0
        assert snap.queries == 10
        assert ledger.check_ledger(session, terms.permit_id)
        assert verify_chain(session).ok


def _crash_worker(db_url: str, path: str, meta_json: str, data_dir: str) -> None:
    import spe.dp.service as service

    def hang(*_a, **_k):  # type: ignore[no-untyped-def]
        time.sleep(600)

    service.release = hang  # reserve commits, then the process hangs "inside" the query
    meta = DatasetMetadata.model_validate_json(meta_json)
    run_query(Database(db_url), Settings(data_dir=Path(data_dir), database_url=db_url),
              make_terms(meta), Caller(actor="alice"), QueryRequest(sql=SQL, epsilon=0.5),
              lambda _n: (meta, Path(path)))


def test_sigkill_between_reserve_and_release(db: Database, db_url: str, ds, tmp_path: Path
                                             ) -> None:  # type: ignore[no-untyped-def]
    meta, path = ds
    terms = make_terms(meta)
    proc = mp.get_context("spawn").Process(
        target=_crash_worker,
        args=(db_url, str(path), meta.model_dump_json(), str(tmp_path / "var")))
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        with db.read() as session:
            if ledger.snapshot(session, terms).queries == 1:
                break
        time.sleep(0.1)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with db.read() as session:
        snap = ledger.snapshot(session, terms)
        assert snap.epsilon_spent == pytest.approx(0.5)  # charged, never refunded
        assert ledger.check_ledger(session, terms.permit_id)
        assert verify_chain(session).ok
    # The next query sees the charge.
    settings = Settings(data_dir=tmp_path / "var", database_url=db_url)
    out = run_query(db, settings, terms, Caller(actor="alice"),
                    QueryRequest(sql=SQL, epsilon=0.5), lambda _n: (meta, path))
    assert out["budget"]["epsilon_spent"] == pytest.approx(1.0)


def test_dry_run_idempotency_receipt_and_audit(db: Database, db_url: str, ds, tmp_path: Path
                                               ) -> None:  # type: ignore[no-untyped-def]
    meta, path = ds
    terms = make_terms(meta)
    settings = Settings(data_dir=tmp_path / "var", database_url=db_url)
    caller = Caller(actor="alice")

    def opener(_n: str) -> tuple[DatasetMetadata, Path]:
        return meta, path

    dry = run_query(db, settings, terms, caller, QueryRequest(sql=SQL, epsilon=0.4,
                                                              dry_run=True), opener)
    assert dry["cost"]["epsilon"] == pytest.approx(0.4)
    assert dry["budget"]["epsilon_spent"] == 0.0
    req = QueryRequest(sql=SQL, epsilon=0.4, idempotency_key="k-1")
    first = run_query(db, settings, terms, caller, req, opener)
    again = run_query(db, settings, terms, caller, req, opener)
    assert again["replayed"] and again["rows"] == first["rows"]
    assert again["budget"]["epsilon_spent"] == pytest.approx(0.4)
    with pytest.raises(Conflict):
        run_query(db, settings, terms, caller,
                  QueryRequest(sql=SQL + " ORDER BY 2", epsilon=0.4, idempotency_key="k-1"),
                  opener)
    secret = settings.secret_key.get_secret_value()
    rc = first["receipt"]
    assert receipt.verify(rc, secret, first["csv"].encode())
    assert receipt.verify(rc, secret, base64.b64decode(first["parquet_b64"]))
    assert not receipt.verify(rc, secret, first["csv"].encode() + b"1,2\n")
    assert not receipt.verify(rc, "another-secret-of-enough-length-000000", first["csv"].encode())
    assert not receipt.verify({**rc, "epsilon": 0.0}, secret)
    # Failures after data access charge and give one generic error.
    with pytest.raises(QueryFailed):
        run_query(db, settings, terms, caller, QueryRequest(sql=SQL, epsilon=0.4),
                  lambda _n: (meta, tmp_path / "missing.duckdb"))
    with db.read() as session:
        snap = ledger.snapshot(session, terms)
        assert snap.epsilon_spent == pytest.approx(0.8)
        assert ledger.check_ledger(session, terms.permit_id)
        assert verify_chain(session).ok
        from sqlalchemy import select

        from spe.audit.models import AuditEntry

        entries = session.execute(select(AuditEntry).where(
            AuditEntry.action.like("dp.%"))).scalars().all()
        actions = [(e.action, e.outcome) for e in entries]
        assert ("dp.query.dry_run", "success") in actions
        assert ("dp.query.replay", "success") in actions
        assert ("dp.query", "failure") in actions
        # the released answer's receipt (what it signs, not its signature) is in the log,
        # so incident evidence carries it
        from spe.audit.incident import release_receipts

        found = release_receipts(session, terms.permit_id)
        assert [r["receipt"]["charge_id"] for r in found] == [rc["charge_id"]]
        assert found[0]["receipt"] == {k: rc[k] for k in receipt.SIGNED_FIELDS}
        assert "signature" not in found[0]["receipt"]
        texts = {e.details["sql_sha256"]: e.details["sql"] for e in entries
                 if "sql" in e.details}
        for e in entries:  # SQL text and cost are audited; released values never are
            assert "rows" not in e.details and "csv" not in e.details
            # The outcome of a charged query names its SQL by hash: the reserve entry holds
            # the text once.
            assert texts[e.details["sql_sha256"]].startswith("SELECT")
        reserved = {e.details["charge_id"] for e in entries
                    if e.action == "dp.query.reserve" and e.details.get("sql")}
        assert all(e.details["charge_id"] in reserved for e in entries
                   if e.action == "dp.query" and "charge_id" in e.details)


def test_refusals_audited_and_free(db: Database, db_url: str, ds, tmp_path: Path
                                   ) -> None:  # type: ignore[no-untyped-def]
    from spe.errors import QueryRefused

    meta, path = ds
    terms = make_terms(meta, max_epsilon_per_query=1.0, per_person_epsilon=1.5)
    settings = Settings(data_dir=tmp_path / "var", database_url=db_url)
    caller = Caller(actor="alice")
    with pytest.raises(QueryRefused):
        run_query(db, settings, terms, caller, QueryRequest(sql="SELECT * FROM person"),
                  lambda _n: (meta, path))
    with pytest.raises(BudgetExceeded):  # per-query cap
        run_query(db, settings, terms, caller, QueryRequest(sql=SQL, epsilon=2.0),
                  lambda _n: (meta, path))
    run_query(db, settings, terms, caller, QueryRequest(sql=SQL, epsilon=1.0),
              lambda _n: (meta, path))
    with pytest.raises(BudgetExceeded):  # per-person cap 1.5
        run_query(db, settings, terms, caller, QueryRequest(sql=SQL, epsilon=1.0),
                  lambda _n: (meta, path))
    with db.read() as session:
        assert ledger.snapshot(session, terms).epsilon_spent == pytest.approx(1.0)
        from sqlalchemy import func, select

        from spe.audit.models import AuditEntry

        n = session.execute(select(func.count()).where(
            AuditEntry.action == "dp.query", AuditEntry.outcome == "refused")).scalar_one()
        assert n == 3
