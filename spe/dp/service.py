"""One DP query end to end: authorise, plan, price, reserve, run, release, audit.

Contract of :func:`run_query` (the function the HTTP API and tests call):

1. The permit must be active (else Forbidden). An epsilon below ``dp_min_epsilon_per_query``
   is refused (no probe is free). A query that touches data (not a dry run) must pass the
   permit's rate limit (:mod:`spe.dp.limits`, when the caller passes ``limits``; the API
   always does): refused with RateLimited (429), audited.
2. Parsing and planning use metadata only; a refusal is audited (``dp.query``, outcome
   refused) and raised as QueryRefused. Any other exception while planning (a RecursionError,
   a bug) becomes the same generic, audited refusal: never a server error. Nothing is charged.
   Refusals record the SQL text the first time it is seen under the permit and only its
   SHA-256 on every retry (when ``limits`` is given; without it, always the text).
3. A dry run returns the cost and the remaining budget, is audited, and costs nothing.
4. Otherwise the cost is reserved in the ledger in one transaction with its audit entry
   (``dp.query.reserve``, with the SQL text). BudgetExceeded is audited and raised; nothing
   is charged.
5. The query runs on DuckDB; every step after it (noise, post-processing, encoding, signing)
   runs under the query deadline. Any exception from here on, whatever its type, keeps the
   charge (a failure after data access is charged like a release) and returns one generic
   :class:`QueryFailed`, audited (outcome failure).
6. The outcome is audited in one transaction with the charge's new state (``dp.query``:
   charge id, SQL hash, receipt hash). The answer is stored for replay only when the request
   has an idempotency key: re-sending that key returns the stored answer without a new charge.
7. Answer time: from the call until the answer (or the generic failure) is ready, the time is
   padded to the next multiple of ``dp_answer_time_bucket_seconds``, so between neighbouring
   datasets the answer time differs only by whole buckets, and only when the work itself
   differs by about a bucket. Refusals before data access are not padded: they depend on the
   SQL, the metadata, the permit and the budget only.

Audit details hold the SQL text (or its hash), the plan summary, the cost and ids; never data
values.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from permits.terms import PermitTerms
from spe.audit import AuditEvent, Outcome, record
from spe.budget import ledger
from spe.config import Settings
from spe.datasets.metadata import DatasetMetadata
from spe.db import Database
from spe.db.base import utcnow
from spe.dp import receipt as receipts
from spe.dp.duck import Deadline
from spe.dp.limits import Limits, RateLimited
from spe.dp.runner import Prepared, prepare, release
from spe.errors import BudgetExceeded, Conflict, Forbidden, QueryRefused, SPEError

logger = logging.getLogger("spe.dp")
DatasetOpener = Callable[[str], tuple[DatasetMetadata, Path]]
DEFAULT_EPSILON = 1.0


class QueryFailed(SPEError):
    status, code, title = 500, "query-failed", "Query failed"


GENERIC_FAILURE = ("The query failed after the data were accessed. Its privacy cost has been "
                   "charged; no further detail can be given without revealing data.")
GENERIC_REFUSAL = ("The query could not be planned. Simplify it (fewer nested expressions, "
                   "fewer groups) and try again.")


@dataclass(frozen=True)
class QueryRequest:
    sql: str
    epsilon: float | None = None
    delta: float | None = None
    dry_run: bool = False
    dataset: str | None = None
    max_rows_per_person: int | None = None
    max_groups_per_person: int | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Caller:
    actor: str
    role: str | None = "researcher"
    request_id: str | None = None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _audit(db: Database, caller: Caller, terms: PermitTerms, outcome: Outcome,
           details: dict[str, Any], reason: str | None = None,
           action: str = "dp.query") -> None:
    with db.write() as session:
        record(session, _event(caller, terms, outcome, details, reason, action))


def _event(caller: Caller, terms: PermitTerms, outcome: Outcome, details: dict[str, Any],
           reason: str | None = None, action: str = "dp.query") -> AuditEvent:
    kwargs: dict[str, Any] = {}
    if caller.request_id:
        kwargs["request_id"] = caller.request_id
    return AuditEvent(action=action, actor=caller.actor, role=caller.role,
                      permit_id=terms.permit_id, target=details.get("dataset"),
                      outcome=outcome, reason=reason, details=details, **kwargs)


def default_delta(terms: PermitTerms) -> float:
    """Delta offered to a query that thresholds non-public keys, unless it names one."""
    return min(1e-6, terms.budget.delta / 10.0)


def _pick_dataset(terms: PermitTerms, requested: str | None) -> str:
    names = [g.dataset for g in terms.datasets]
    if requested is not None:
        if requested not in names:
            raise QueryRefused("The permit does not grant the dataset named in 'dataset'.")
        return requested
    if len(names) != 1:
        raise QueryRefused("The permit grants several datasets: name one in 'dataset'.")
    return names[0]


def padding_left(started: float, bucket: float) -> float:
    """Seconds from now to the next multiple of ``bucket`` after ``started`` (monotonic)."""
    if bucket <= 0:
        return 0.0
    elapsed = time.monotonic() - started
    return max(1, math.ceil(elapsed / bucket)) * bucket - elapsed


def pad_answer_time(started: float, bucket: float) -> None:
    """Sleep until the next multiple of ``bucket`` seconds after ``started`` (monotonic)."""
    left = padding_left(started, bucket)
    if left > 0:
        time.sleep(left)


def _refusal_details(base: dict[str, Any], permit_id: str, limits: Limits | None
                     ) -> dict[str, Any]:
    """``base`` with the SQL text only the first time this SQL is refused under the permit."""
    if limits is None or limits.first_sighting(permit_id, base["sql_sha256"]):
        return base
    return {k: v for k, v in base.items() if k != "sql"}


def run_query(db: Database, settings: Settings, terms: PermitTerms, caller: Caller,
              req: QueryRequest, open_dataset: DatasetOpener,
              limits: Limits | None = None, pad: bool = True) -> dict[str, Any]:
    """Answer ``req`` under ``terms`` for ``caller`` (see module docstring).

    ``pad=False``: the caller pads the answer time itself (the API does, without holding a
    thread): every answer that is not a dry run or a replay, and every QueryFailed.
    """
    started = time.monotonic()
    base = {"sql": req.sql[:20_000], "sql_sha256": _sha(req.sql), "dry_run": req.dry_run}
    if not terms.usable:
        _audit(db, caller, terms, Outcome.REFUSED, _refusal_details(base, terms.permit_id,
                                                                    limits),
               f"permit is {terms.state_text}")
        raise Forbidden(f"The permit is {terms.state_text}; queries need an active permit.")
    epsilon = DEFAULT_EPSILON if req.epsilon is None else float(req.epsilon)
    if req.epsilon is None:
        epsilon = min(epsilon, terms.budget.max_epsilon_per_query)
    delta = default_delta(terms) if req.delta is None else float(req.delta)
    try:
        if not epsilon >= settings.dp_min_epsilon_per_query:
            raise QueryRefused(
                f"Every query spends at least epsilon {settings.dp_min_epsilon_per_query:g}; "
                "ask for more (within the permit's per-query maximum).")
        if limits is not None and not req.dry_run:
            limits.permit_query(terms.permit_id)
        dataset = _pick_dataset(terms, req.dataset)
        base["dataset"] = dataset
        meta, path = open_dataset(dataset)
        prepared = prepare(req.sql, meta, terms, epsilon=epsilon, delta=delta,
                           max_rows_per_person=req.max_rows_per_person,
                           max_groups_per_person=req.max_groups_per_person)
    except (QueryRefused, RateLimited) as err:
        _audit(db, caller, terms, Outcome.REFUSED,
               _refusal_details(base, terms.permit_id, limits), err.detail)
        raise
    except SPEError:
        raise  # e.g. the dataset's store file is missing (503): not about this query
    except Exception as err:  # noqa: BLE001 - RecursionError, a planner bug: never a 500
        logger.warning("dp query could not be planned",
                       extra={"fields": {"error": type(err).__name__}})
        _audit(db, caller, terms, Outcome.REFUSED,
               _refusal_details(base, terms.permit_id, limits),
               f"planning failed ({type(err).__name__})")
        raise QueryRefused(GENERIC_REFUSAL) from None
    cost = prepared.cost
    details = {**base, "plan": prepared.plan.summary(),
               "cost": {"epsilon": cost.epsilon, "delta": cost.delta}}
    if req.dry_run:
        with db.write() as session:
            snap = ledger.snapshot(session, terms, caller.actor)
            record(session, _event(caller, terms, Outcome.SUCCESS, details,
                                   action="dp.query.dry_run"))
        return {"dry_run": True, "cost": details["cost"], "plan": details["plan"],
                "budget": snap.as_dict()}
    if req.idempotency_key:
        replay = _replay(db, caller, terms, req, details, prepared.plan.fingerprint())
        if replay is not None:
            return replay
    charge_id = _reserve(db, caller, terms, req, prepared, details)
    outcome = {k: v for k, v in details.items() if k != "sql"}  # the reserve entry has it
    try:
        deadline = Deadline(settings.query_timeout_seconds)
        rel = release(prepared, path, settings, deadline)
        answer = _answer(settings, terms, prepared, rel, charge_id, dataset)
        deadline.check()
        with db.write() as session:
            ledger.finish(session, charge_id, released=True,
                          result=answer if req.idempotency_key else None)
            snap = ledger.snapshot(session, terms, caller.actor)
            record(session, _event(caller, terms, Outcome.SUCCESS,
                                   {**outcome, "charge_id": charge_id,
                                    "receipt_sha256_csv": answer["receipt"]["sha256_csv"],
                                    # what the receipt signs (hashes, counts, names; no values,
                                    # no signature): incident evidence carries it
                                    "receipt": {k: answer["receipt"].get(k)
                                                for k in receipts.SIGNED_FIELDS}}))
    except Exception as err:  # noqa: BLE001 - every failure after data access is generic
        logger.warning("dp query failed after reserve",
                       extra={"fields": {"charge_id": charge_id, "error": type(err).__name__}})
        _fail(db, caller, terms, charge_id, outcome, err)
        if pad:
            pad_answer_time(started, settings.dp_answer_time_bucket_seconds)
        raise QueryFailed(GENERIC_FAILURE) from None
    if pad:
        pad_answer_time(started, settings.dp_answer_time_bucket_seconds)
    return {**answer, "budget": snap.as_dict(), "replayed": False}


def _fail(db: Database, caller: Caller, terms: PermitTerms, charge_id: str,
          details: dict[str, Any], err: BaseException) -> None:
    """Mark the charge failed (it stays charged) and audit the generic failure."""
    try:
        with db.write() as session:
            ledger.finish(session, charge_id, released=False, error=type(err).__name__)
            record(session, _event(caller, terms, Outcome.FAILURE,
                                   {**details, "charge_id": charge_id},
                                   reason="failed after data access (charged)"))
    except Exception:  # the charge is committed already: log and go on
        logger.exception("could not record a failed dp query",
                         extra={"fields": {"charge_id": charge_id}})


def _replay(db: Database, caller: Caller, terms: PermitTerms, req: QueryRequest,
            details: dict[str, Any], plan_hash: str) -> dict[str, Any] | None:
    """The stored answer of this key, only for the same researcher and the same request.

    Same request: the SQL text and the plan fingerprint (dataset, bounds, epsilon, delta, ...)
    that the charge recorded. Another researcher of the permit, or other parameters, get a
    Conflict: the answer was charged to, and computed for, that one request.
    """
    assert req.idempotency_key is not None
    with db.read() as session:
        charge = ledger.find_charge(session, terms.permit_id, req.idempotency_key)
        if charge is None:
            return None
        state, result, sql_sha = charge.state, charge.result, charge.sql_sha256
        same = (sql_sha == details["sql_sha256"] and charge.plan_hash == plan_hash
                and charge.actor == caller.actor)
    if not same:
        raise Conflict("This idempotency key was already used for a different query.")
    if state == ledger.RESERVED:
        raise Conflict("The query with this idempotency key is still running; retry later.")
    if state == ledger.FAILED or result is None:
        raise QueryFailed(GENERIC_FAILURE)
    with db.write() as session:
        snap = ledger.snapshot(session, terms, caller.actor)
        record(session, _event(caller, terms, Outcome.SUCCESS,
                               {**details, "charge_id": result.get("charge_id")},
                               action="dp.query.replay"))
    return {**result, "budget": snap.as_dict(), "replayed": True}


def _reserve(db: Database, caller: Caller, terms: PermitTerms, req: QueryRequest,
             prepared: Prepared, details: dict[str, Any]) -> str:
    try:
        with db.write() as session:
            if req.idempotency_key:
                ledger.lock(session, terms.permit_id)
                if ledger.find_charge(session, terms.permit_id, req.idempotency_key):
                    raise Conflict("This idempotency key is already in use; retry to replay.")
            charge = ledger.reserve(
                session, terms, actor=caller.actor, epsilon=prepared.cost.epsilon,
                delta=prepared.cost.delta, plan_hash=prepared.plan.fingerprint(),
                sql_sha256=details["sql_sha256"], idempotency_key=req.idempotency_key)
            record(session, _event(caller, terms, Outcome.SUCCESS,
                                   {**details, "charge_id": charge.id},
                                   action="dp.query.reserve"))
            return charge.id
    except BudgetExceeded as err:
        _audit(db, caller, terms, Outcome.REFUSED, details, err.detail)
        raise


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None and numpy scalars as Python values, so
    encoding the response can never fail after the data were touched."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return _clean(value)


def _answer(settings: Settings, terms: PermitTerms, prepared: Prepared, rel: Any,
            charge_id: str, dataset: str) -> dict[str, Any]:
    table = rel.table
    csv, parquet = receipts.output_bytes(table)
    issued = utcnow().isoformat(timespec="seconds")
    receipt = receipts.sign(
        settings.secret_key.get_secret_value(), permit_id=terms.permit_id,
        charge_id=charge_id, dataset=dataset, csv=csv, parquet=parquet,
        epsilon=prepared.cost.epsilon, delta=prepared.cost.delta, issued_at=issued,
        rows=len(table), columns=[str(c) for c in table.columns])
    rows = [[_clean(v) for v in row] for row in table.itertuples(index=False, name=None)]
    return {
        "charge_id": charge_id,
        "columns": [str(c) for c in table.columns],
        "rows": rows,
        "accuracy": _json_safe(rel.accuracy),
        "cells": _json_safe(rel.cells),
        "cost": {"epsilon": prepared.cost.epsilon, "delta": prepared.cost.delta},
        "plan": prepared.plan.summary(),
        "receipt": receipt,
        "csv": csv.decode(),
        "parquet_b64": base64.b64encode(parquet).decode(),
    }


def budget_status(db: Database, terms: PermitTerms, actor: str | None = None
                  ) -> dict[str, Any]:
    with db.read() as session:
        return ledger.snapshot(session, terms, actor).as_dict()


def budget_charges(db: Database, terms: PermitTerms, limit: int = 50) -> dict[str, Any]:
    """The permit's newest DP queries as the budget recorded them (time, cost, state)."""
    with db.read() as session:
        return {"permit_id": terms.permit_id,
                "items": ledger.recent_charges(session, terms.permit_id, limit)}
