"""Side channels and free probes of the DP service (issue: every table bound to the patient).

* Answer time: padded to a bucket, so neighbouring datasets (one person with many rows added
  or removed) answer in the same whole number of buckets; with padding off, the times are not
  on the bucket grid (the control shows the check can fail).
* No free probe: an epsilon below the minimum is refused; the permit's query rate is limited
  and its refusals record the SQL text once, then only its hash.
* Bounded work: deep expressions are refused quickly (no RecursionError, no server error);
  a thresholded query never fetches more than the configured number of groups.
* Errors do not depend on data: an exception injected anywhere after planning gives the same
  generic, audited failure, charged like a release; one injected while planning gives a
  generic audited refusal, not charged.

Timing assertions hold on a loaded machine: they check the bucket property (every answer
time sits just after a whole number of buckets, the same number for both neighbours), with
margins of a fraction of a bucket; speed itself is measured in ``bench/dp_query``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.budget import ledger
from spe.budget.models import BudgetCharge
from spe.config import Settings
from spe.db import Database
from spe.dp import duck, engine, service
from spe.dp.limits import Limits, RateLimited, TokenBucket
from spe.dp.parse import MAX_DEPTH, parse
from spe.dp.service import GENERIC_FAILURE, GENERIC_REFUSAL, Caller, QueryFailed, QueryRequest
from spe.dp.testing import make_dataset, make_terms
from spe.errors import QueryRefused

HEAVY = 77
HEAVY_ROWS = 20_000
ADD_HEAVY = f"""
INSERT INTO _measurement SELECT 10000000 + i, 10000000 + i, {HEAVY}, 3004249,
  DATE '2015-06-01', 60.0 FROM range({HEAVY_ROWS}) t(i);
"""
REMOVE = f"""
DELETE FROM _measurement WHERE person_id = {HEAVY};
DELETE FROM _condition_occurrence WHERE person_id = {HEAVY};
DELETE FROM _drug_exposure WHERE person_id = {HEAVY};
DELETE FROM _person WHERE person_id = {HEAVY};
"""
SQL = "SELECT measurement_concept_id, AVG(value_as_number) FROM measurement GROUP BY 1"
BUCKET = 0.25


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path, Path]:
    base = Path(tmp_path_factory.mktemp("side"))
    meta = make_dataset(base / "with.duckdb", persons=300, rows_per_person=4,
                        extra_sql=ADD_HEAVY)
    make_dataset(base / "without.duckdb", persons=300, rows_per_person=4, extra_sql=REMOVE)
    return meta, base / "with.duckdb", base / "without.duckdb", base


def _settings(base: Path, db_url: str, **kw: Any) -> Settings:
    return Settings(data_dir=base / "var", database_url=db_url, **kw)


def _entries(db: Database, action: str = "dp.query") -> list[AuditEntry]:
    with db.read() as session:
        return list(session.execute(select(AuditEntry).where(AuditEntry.action == action)
                                    .order_by(AuditEntry.seq)).scalars())


def _spent(db: Database, terms: Any) -> float:
    with db.read() as session:
        return ledger.snapshot(session, terms).epsilon_spent


# Answer time -------------------------------------------------------------------------------

def _on_grid(t: float) -> bool:
    """The answer left just after a whole number (>= 1) of buckets: sleep overshoot and the
    return path only (generous for a loaded machine). The caller's clock starts before the
    service's, so t is never below the padded time."""
    k = int(t // BUCKET)
    return k >= 1 and t - k * BUCKET < 0.4 * BUCKET


def _times(db: Database, settings: Settings, meta: Any, path: Path, n: int, sql: str = SQL
           ) -> list[float]:
    terms = make_terms(meta, epsilon=1e6, max_epsilon_per_query=10)
    out = []
    for _ in range(n):
        t = time.monotonic()
        service.run_query(db, settings, terms, Caller(actor="alice"),
                          QueryRequest(sql=sql, epsilon=0.1), lambda _n: (meta, path))
        out.append(time.monotonic() - t)
    return out


@pytest.mark.parametrize("sql", [
    SQL,
    "SELECT COUNT(DISTINCT person_id) FROM measurement",  # every path is truncated
    "SELECT year(measurement_date) AS y, COUNT(DISTINCT person_id) FROM measurement "
    "GROUP BY 1",
])
def test_answer_time_padded_to_the_bucket_on_neighbours(sqlite_db: Database, pair, sql: str
                                                        ) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, without_path, base = pair
    settings = _settings(base, sqlite_db.url, dp_answer_time_bucket_seconds=BUCKET)
    times = {p.name: _times(sqlite_db, settings, meta, p, 6, sql)
             for p in (with_path, without_path)}
    buckets = {}
    for name, ts in times.items():
        assert all(_on_grid(t) for t in ts), (name, ts)
        buckets[name] = statistics.median_low(int(t // BUCKET) for t in ts)
    # The typical answer of each neighbour lands in the same bucket: the heavy person's
    # 20,000 rows do not move it.
    assert buckets["with.duckdb"] == buckets["without.duckdb"], times


def test_control_without_padding_times_are_not_on_the_grid(sqlite_db: Database, pair) -> None:  # type: ignore[no-untyped-def]
    """The check above can fail: with padding off, answers come back well inside a bucket."""
    meta, with_path, _without, base = pair
    settings = _settings(base, sqlite_db.url, dp_answer_time_bucket_seconds=0)
    ts = _times(sqlite_db, settings, meta, with_path, 3)
    assert not all(_on_grid(t) for t in ts), ts


def test_failures_are_padded_too(sqlite_db: Database, pair, monkeypatch: pytest.MonkeyPatch
                                 ) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _without, base = pair
    settings = _settings(base, sqlite_db.url, dp_answer_time_bucket_seconds=BUCKET)

    def boom(*_a: Any, **_k: Any) -> Any:
        raise ValueError("data-dependent detail 12345")

    monkeypatch.setattr(service, "release", boom)
    t = time.monotonic()
    with pytest.raises(QueryFailed):
        service.run_query(sqlite_db, settings, make_terms(meta), Caller(actor="alice"),
                          QueryRequest(sql=SQL, epsilon=0.1), lambda _n: (meta, with_path))
    elapsed = time.monotonic() - t
    assert BUCKET <= elapsed < BUCKET * 1.4 + 0.1


# No free probes ----------------------------------------------------------------------------

def test_min_epsilon_refused_and_audited(db: Database, db_url: str, pair) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _without, base = pair
    settings = _settings(base, db_url, dp_answer_time_bucket_seconds=0)
    terms = make_terms(meta)
    with pytest.raises(QueryRefused) as err:
        service.run_query(db, settings, terms, Caller(actor="alice"),
                          QueryRequest(sql=SQL, epsilon=0.005), lambda _n: (meta, with_path))
    assert "0.01" in err.value.detail
    # A permit whose per-query maximum is below the minimum cannot query by default either.
    small = make_terms(meta, max_epsilon_per_query=0.001)
    with pytest.raises(QueryRefused):
        service.run_query(db, settings, small, Caller(actor="alice"),
                          QueryRequest(sql=SQL), lambda _n: (meta, with_path))
    # Exactly the minimum is allowed.
    out = service.run_query(db, settings, terms, Caller(actor="alice"),
                            QueryRequest(sql=SQL, epsilon=0.01), lambda _n: (meta, with_path))
    assert out["cost"]["epsilon"] == pytest.approx(0.01)
    refused = [e for e in _entries(db) if e.outcome == "refused"]
    assert len(refused) == 2 and _spent(db, terms) == pytest.approx(0.01)


def test_permit_rate_limit_and_sql_recorded_once(db: Database, db_url: str, pair) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _without, base = pair
    settings = _settings(base, db_url, dp_answer_time_bucket_seconds=0,
                         dp_permit_queries_per_minute=1, dp_permit_query_burst=2)
    limits = Limits(settings)
    terms = make_terms(meta)

    def ask(dry: bool = False) -> dict[str, Any]:
        return service.run_query(db, settings, terms, Caller(actor="alice"),
                                 QueryRequest(sql=SQL, epsilon=0.1, dry_run=dry),
                                 lambda _n: (meta, with_path), limits)

    ask()
    ask()
    for _ in range(3):  # the burst is spent: refused, free, audited
        with pytest.raises(RateLimited) as err:
            ask()
        assert err.value.status == 429 and int(err.value.headers["Retry-After"]) >= 1
    assert ask(dry=True)["dry_run"]  # dry runs touch no data: not limited per permit
    assert _spent(db, terms) == pytest.approx(0.2)
    refused = [e for e in _entries(db) if e.outcome == "refused"]
    assert len(refused) == 3
    assert all(e.details["sql_sha256"] == refused[0].details["sql_sha256"] for e in refused)
    assert [("sql" in e.details) for e in refused] == [True, False, False]


def test_token_bucket_and_concurrency() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, stamp=0.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(1.0) == 0.0
    limits = Limits(Settings(api_token_concurrency=2, api_token_burst=100))
    limits.enter("t")
    limits.enter("t")
    with pytest.raises(RateLimited):
        limits.enter("t")
    limits.enter("other")  # another token is not affected
    limits.leave("t")
    limits.enter("t")


def test_refusals_are_folded_not_lost() -> None:
    """One audit entry per token per window; the others are counted into the next entry."""
    limits = Limits(Settings(), fold_seconds=1.0)
    assert limits.fold_refusal("t", now=10.0) == 0  # written
    assert limits.fold_refusal("t", now=10.5) is None  # folded
    assert limits.fold_refusal("t", now=10.9) is None
    assert limits.fold_refusal("u", now=10.9) == 0  # another token: its own window
    assert limits.fold_refusal("t", now=11.2) == 2  # written, standing for the two folded
    assert limits.fold_refusal("t", now=11.3) is None
    assert limits.take_folded("t") == 1  # the next admitted request writes the count
    assert limits.take_folded("t") == 0


# Bounded work ------------------------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "SELECT COUNT(*) FROM person WHERE " + "(" * 5000 + "year_of_birth > 1" + ")" * 5000,
    "SELECT SUM(" + "1 + " * 4000 + "year_of_birth) FROM person",
    "SELECT COUNT(*) FROM person WHERE " + " OR ".join(["a = 1"] * 2000),
    "SELECT COUNT(*) FROM person WHERE " + "NOT " * 3000 + "year_of_birth > 1",
    "SELECT COUNT(*) FROM person WHERE year_of_birth > " + "- " * 5000 + "1",
])
def test_deep_expressions_refused_quickly(sql: str) -> None:
    assert len(sql) <= 20_000  # refused for its depth, not its length
    t = time.monotonic()
    with pytest.raises(QueryRefused) as err:
        parse(sql)
    assert time.monotonic() - t < 3.0
    assert "nested" in err.value.detail or "not valid" in err.value.detail


def test_depth_limit_leaves_ordinary_queries_alone() -> None:
    parse("SELECT COUNT(*) FROM person WHERE " + " AND ".join(
        [f"year_of_birth <> {i}" for i in range(MAX_DEPTH // 2)]))


def test_planning_exception_is_a_generic_audited_refusal(
        db: Database, db_url: str, pair, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _without, base = pair
    settings = _settings(base, db_url, dp_answer_time_bucket_seconds=0)
    terms = make_terms(meta)

    def deep(*_a: Any, **_k: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("spe.dp.runner.compile_plan", deep)
    with pytest.raises(QueryRefused) as err:
        service.run_query(db, settings, terms, Caller(actor="alice"),
                          QueryRequest(sql=SQL, epsilon=0.1), lambda _n: (meta, with_path))
    assert err.value.detail == GENERIC_REFUSAL
    (entry,) = _entries(db)
    assert entry.outcome == "refused" and "RecursionError" in (entry.reason or "")
    assert _spent(db, terms) == 0.0


def _fail_in_release(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise exc
    monkeypatch.setattr(service, "release", boom)


def _fail_in_noise(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise exc
    monkeypatch.setattr(engine.mech, "laplace_release", boom)


def _fail_in_encoding(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise exc
    monkeypatch.setattr(service.receipts, "output_bytes", boom)


def _fail_in_final_commit(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    real = ledger.finish

    def boom(session: Any, charge_id: str, *, released: bool, **kw: Any) -> Any:
        if released:
            raise exc
        return real(session, charge_id, released=released, **kw)
    monkeypatch.setattr(service.ledger, "finish", boom)


@pytest.mark.parametrize("where", [_fail_in_release, _fail_in_noise, _fail_in_encoding,
                                   _fail_in_final_commit])
@pytest.mark.parametrize("exc", [RecursionError("deep 4711"), ValueError("value 4711"),
                                 KeyError("4711"), MemoryError()])
def test_failure_after_planning_is_generic_audited_and_charged(
        db: Database, db_url: str, pair, monkeypatch: pytest.MonkeyPatch, where: Any,
        exc: BaseException) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _without, base = pair
    settings = _settings(base, db_url, dp_answer_time_bucket_seconds=0)
    terms = make_terms(meta)
    where(monkeypatch, exc)
    with pytest.raises(QueryFailed) as err:
        service.run_query(db, settings, terms, Caller(actor="alice"),
                          QueryRequest(sql=SQL, epsilon=0.3), lambda _n: (meta, with_path))
    assert err.value.detail == GENERIC_FAILURE and "4711" not in str(err.value)
    assert _spent(db, terms) == pytest.approx(0.3)  # charged like a release
    failures = [e for e in _entries(db) if e.outcome == "failure"]
    assert len(failures) == 1 and "4711" not in str(failures[0].details)
    with db.read() as session:
        (charge,) = session.execute(select(BudgetCharge)).scalars()
        assert charge.state == ledger.FAILED and charge.result is None
        assert ledger.check_ledger(session, terms.permit_id)


def test_post_processing_runs_under_the_deadline(
        db: Database, db_url: str, pair, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _without, base = pair
    settings = _settings(base, db_url, dp_answer_time_bucket_seconds=0,
                         query_timeout_seconds=0.5)
    terms = make_terms(meta)
    real = engine.mech.laplace_release

    def slow(values: list[int], unit: Any) -> list[int]:
        time.sleep(0.3)  # e.g. a huge post-processing step
        return real(values, unit)
    monkeypatch.setattr(engine.mech, "laplace_release", slow)
    t = time.monotonic()
    with pytest.raises(QueryFailed):
        service.run_query(db, settings, terms, Caller(actor="alice"),
                          QueryRequest(sql=SQL, epsilon=0.3), lambda _n: (meta, with_path))
    assert time.monotonic() - t < 5.0
    assert _spent(db, terms) == pytest.approx(0.3)


THRESHOLDED = ("SELECT condition_concept_id, COUNT(*) FROM condition_occurrence "
               "GROUP BY 1")


def test_threshold_fetch_is_bounded(db: Database, db_url: str, pair) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, _without, base = pair
    terms = make_terms(meta, epsilon=100)
    ok = _settings(base, db_url, dp_answer_time_bucket_seconds=0)
    out = service.run_query(db, ok, terms, Caller(actor="alice"),
                            QueryRequest(sql=THRESHOLDED, epsilon=5.0),
                            lambda _n: (meta, with_path))
    assert 0 < len(out["rows"]) <= 20
    # Groups of single rows are never fetched: grouping by a row id reads no group at all.
    prepared = service.prepare("SELECT condition_occurrence_id, COUNT(*) FROM "
                               "condition_occurrence GROUP BY 1", meta, terms, epsilon=1.0,
                               delta=1e-6)
    unit = next(u for u in prepared.cost.units if u.role == "select")
    floor = engine.threshold_floor(unit)
    assert floor > 1
    sql, _names = engine.row_stats_sql(prepared.plan, floor, 11)
    with duck.cursor(with_path, ok) as con:
        assert con.execute(sql).fetchall() == []
        # And the fetch never returns more than the cap, whatever the data.
        sql2, _ = engine.row_stats_sql(service.prepare(
            THRESHOLDED, meta, terms, epsilon=1.0, delta=1e-6).plan, 1, 3)
        assert len(con.execute(sql2).fetchall()) == 3
    # Past the cap the query fails generically and is charged.
    capped = _settings(base, db_url, dp_answer_time_bucket_seconds=0,
                       dp_max_threshold_groups=2)
    with pytest.raises(QueryFailed):
        service.run_query(db, capped, terms, Caller(actor="alice"),
                          QueryRequest(sql=THRESHOLDED, epsilon=1.0),
                          lambda _n: (meta, with_path))
    assert _spent(db, terms) == pytest.approx(6.0)


@pytest.mark.parametrize("m", [1, 2])
def test_bounded_distinct_and_quantile_fetch_equal_the_unbounded_ones(pair, m: int) -> None:  # type: ignore[no-untyped-def]
    """Restricting a thresholded plan's distinct and quantile fetches to big groups returns,
    for each big group, exactly the statistic computed without the restriction (the person's
    m groups are chosen among all their groups, not among the big ones)."""
    meta, with_path, _without, base = pair
    terms = make_terms(meta)
    plan = service.prepare(
        "SELECT c.condition_concept_id, COUNT(DISTINCT c.person_id), MEDIAN(p.year_of_birth) "
        "FROM condition_occurrence c JOIN person p ON c.person_id = p.person_id GROUP BY 1",
        meta, terms, epsilon=1.0, delta=1e-6, max_groups_per_person=m).plan
    assert not plan.public_keys
    with duck.cursor(with_path, Settings(data_dir=base / "var")) as con:
        sql, names = engine.row_stats_sql(plan)
        rows = {r[0]: dict(zip(names, r[1:], strict=True))["rows"]
                for r in con.execute(sql).fetchall()}
        floor = sorted(rows.values())[len(rows) // 2]  # about half the groups are big
        big = {k for k, n in rows.items() if n >= floor}
        assert 0 < len(big) < len(rows)
        salt = 987654321
        full = dict(con.execute(engine.distinct_sql(plan, salt)).fetchall())
        bounded = dict(con.execute(engine.distinct_sql(plan, salt, floor)).fetchall())
        assert bounded == {k: v for k, v in full.items() if k in big}
        agg = plan.aggregates[1]
        full_q = sorted(con.execute(engine.quantile_sql(plan, agg)).fetchall())
        bounded_q = sorted(con.execute(engine.quantile_sql(plan, agg, floor)).fetchall())
        assert bounded_q == [r for r in full_q if r[0] in big]
