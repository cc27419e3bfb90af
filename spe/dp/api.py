"""HTTP API of DP queries.

* ``POST /v1/permits/{permit_id}/queries``: body ``{sql, epsilon?, delta?, dry_run?, dataset?,
  max_rows_per_person?, max_groups_per_person?}``, optional ``Idempotency-Key`` header.
* ``GET /v1/permits/{permit_id}/budget``: spent and remaining budget.

Queries are authorised for a researcher named in the permit, with their own user token or a
workspace token bound to that permit (and still naming a person the permit names: a person
removed by an amendment loses access at once, even through a live workspace token); the permit
must be active. The budget may also be read, whatever the permit's status, by the access body
that issued the permit and by hospital admins (``permits.policy.can_see``). Every
authorisation refusal is audited (``dp.query`` / ``dp.budget``, outcome refused). Errors are
RFC 9457 problems (QueryRefused 400, not named or inactive permit 403, BudgetExceeded 403,
unknown permit 404, RateLimited 429 with ``Retry-After``, QueryFailed 500 with one generic
message).

Limits (:mod:`spe.dp.limits`, one set per app): every DP request of a token (query, dry run,
budget read) passes the token's rate and concurrency limits before anything else is done for
it, and every query that touches data passes its permit's rate limit. A refusal is audited
(``dp.query`` / ``dp.budget``, outcome refused) with the SQL's hash, and the SQL text only the
first time that SQL is seen under the permit, not again on every retry. A token's own refusals
are folded (at most one entry per token per second, carrying the count of the others in
``folded_refusals``), so a client retrying in a loop cannot flood the audit log.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from permits.terms import PermitTerms
from spe.api.deps import PermitId
from spe.api.problems import problem_responses
from spe.api.routing import AuditedRoute
from spe.api.state import StateKey, get_state
from spe.audit import record_refusal
from spe.auth.deps import get_principal, require_role
from spe.auth.principal import Principal, Role
from spe.datasets.metadata import DatasetMetadata
from spe.dp.limits import Limits, RateLimited
from spe.dp.schemas import BudgetCharges, BudgetStatus, QueryAnswer
from spe.dp.service import (
    Caller,
    QueryFailed,
    QueryRequest,
    budget_charges,
    budget_status,
    padding_left,
    run_query,
)
from spe.errors import Forbidden, InvalidInput, NotFound, SPEError

#: Audited routes: refusals this module or the service already recorded are marked
#: ``audited``; the rest (a wrong role, no token, a schema error) the route records.
router = APIRouter(tags=["dp-queries"], route_class=AuditedRoute)


class QueryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sql: str = Field(min_length=1, max_length=20_000, description="one DuckDB SELECT")
    epsilon: float | None = Field(
        None, gt=0, le=100, allow_inf_nan=False,
        description="epsilon to spend (default: min(1, the permit's per-query maximum))")
    delta: float | None = Field(
        None, ge=0, lt=1, allow_inf_nan=False,
        description="delta offered for non-public group keys (charged only when keys are "
        "thresholded)")
    dry_run: bool = Field(False, description="return the cost without running (free)")
    dataset: str | None = Field(None, max_length=64)
    max_rows_per_person: int | None = Field(None, ge=1, le=1000)
    max_groups_per_person: int | None = Field(None, ge=1, le=1000)


def not_visible(permit_id: str) -> NotFound:
    """The refusal for a permit that does not exist or that the caller may not see."""
    return NotFound(f"No permit {permit_id} visible to the caller.")


def _terms(request: Request, permit_id: str) -> PermitTerms:
    from permits.service import get_terms

    with get_state(request).db.read() as session:
        try:
            return get_terms(session, permit_id)
        except NotFound:
            raise not_visible(permit_id) from None


def _named(principal: Principal, terms: PermitTerms) -> None:
    """Refuse callers the permit does not name with the same 404 an unknown permit gets, so
    permit ids cannot be probed (as in ``permits.policy``)."""
    hidden = not_visible(terms.permit_id)
    if principal.kind == "workspace":
        if principal.permit_id != terms.permit_id:
            raise hidden
        if not terms.names(principal.username):
            raise Forbidden("The person of this workspace token is no longer named in the "
                            "permit.")
    elif principal.kind == "user":
        if not terms.names(principal.username):
            raise hidden
    else:
        raise Forbidden("DP queries are made by researchers named in the permit.")


def authorise(principal: Principal, terms: PermitTerms) -> None:
    """Raise unless ``principal`` may query under ``terms`` right now: a workspace token must
    be bound to this permit, then ``permits.policy.check_use`` decides (the rule the spawner
    applies too); a user the permit does not name gets the 404 an unknown permit gets."""
    from permits.policy import check_use

    if principal.kind == "workspace":
        if principal.permit_id != terms.permit_id:
            raise not_visible(terms.permit_id)
        check_use(principal.username, terms)
    elif principal.kind == "user":
        check_use(principal.username, terms, hide_unnamed=True)
    else:
        raise Forbidden("DP queries are made by researchers named in the permit.")


def authorise_budget_read(principal: Principal, terms: PermitTerms) -> None:
    """Raise Forbidden unless ``principal`` may read the permit's budget (any status)."""
    from permits.policy import can_see

    if Role.RESEARCHER in principal.roles and principal.kind in ("user", "workspace"):
        _named(principal, terms)
        return
    if not can_see(principal, terms.permit_id, terms.access_body, terms.persons):
        raise not_visible(terms.permit_id)


def _audit_refusal(request: Request, principal: Principal, permit_id: str, action: str,
                   reason: str, extra: dict[str, Any] | None = None) -> None:
    """Record a refusal through the one refusal helper (``spe.audit.record_refusal``)."""
    record_refusal(get_state(request).db, action, actor=principal.actor,
                   role=principal.primary_role(), reason=reason, permit_id=permit_id,
                   request_id=getattr(request.state, "request_id", None),
                   details={"principal_kind": principal.kind, **(extra or {})})


#: The app's limits, one set per app (tests put their own with ``state.put(LIMITS_KEY, ...)``).
LIMITS_KEY: StateKey[Limits] = StateKey("dp.limits")


def limits_of(request: Request) -> Limits:
    """The app's :class:`~spe.dp.limits.Limits` (created on first use)."""
    state = get_state(request)
    return state.get_or_create(LIMITS_KEY, lambda: Limits(state.settings))


def _token_key(principal: Principal) -> str:
    """One key per token: a workspace token by its id, any other caller by its subject."""
    if principal.token_id:
        return f"token:{principal.token_id}"
    return f"{principal.kind}:{principal.subject}"


def _admit(request: Request, principal: Principal, permit_id: str, action: str,
           sql: str | None = None, dry_run: bool | None = None) -> tuple[Limits, str]:
    """Pass the token's limits (or raise RateLimited, audited and folded, see module doc)."""
    limits, key = limits_of(request), _token_key(principal)
    try:
        limits.enter(key)
    except RateLimited as err:
        folded = limits.fold_refusal(key)
        if folded is not None:
            extra: dict[str, Any] = {"folded_refusals": folded}
            if dry_run is not None:
                extra["dry_run"] = dry_run
            _audit_refusal(request, principal, permit_id, action, err.detail,
                           {**extra, **_sql_details(limits, permit_id, sql)})
        err.audited = True  # written, or counted in the token's next entry (folded)
        raise
    folded = limits.take_folded(key)
    if folded:
        try:
            _audit_refusal(request, principal, permit_id, action,
                           "earlier requests over the token's rate or concurrency limit",
                           {"folded_refusals": folded})
        except Exception:
            limits.leave(key)
            raise
    return limits, key


def _sql_details(limits: Limits, permit_id: str, sql: str | None) -> dict[str, Any]:
    if sql is None:
        return {}
    sha = hashlib.sha256(sql.encode()).hexdigest()
    out: dict[str, Any] = {"sql_sha256": sha}
    if limits.first_sighting(permit_id, sha):
        out["sql"] = sql
    return out


def _checked(request: Request, principal: Principal, permit_id: str, action: str,
             check: Any) -> PermitTerms:
    """The permit's terms after ``check(principal, terms)``; refusals are audited."""
    try:
        terms = _terms(request, permit_id)
        check(principal, terms)
    except (Forbidden, NotFound) as err:
        _audit_refusal(request, principal, permit_id, action, err.detail)
        err.audited = True
        raise
    return terms


def _opener(request: Request) -> Any:
    from spe.datasets.registry import open_dataset

    state = get_state(request)

    def _open(name: str) -> tuple[DatasetMetadata, Path]:
        return open_dataset(state.db, state.settings, name)

    return _open


@router.post(
    "/v1/permits/{permit_id}/queries", name="dp.query", operation_id="postQuery",
    summary="Answer a DP query",
    description="A researcher named in the active permit sends one DuckDB SELECT; the answer "
    "is the noisy table with its accuracy, cost and a signed release receipt (or, with "
    "`dry_run`, only the cost). Refusals: 400 a construct the engine does not accept (named, "
    "with an alternative), 403 inactive permit, a person no longer named, or budget exceeded, "
    "404 a permit not visible to the caller, 429 over the token's or permit's rate limit "
    "(`Retry-After`). A failure after the data were read is one generic 500 and keeps the "
    "charge. Same `Idempotency-Key` and plan: the stored answer, no new charge.",
    response_model=QueryAnswer,
    responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 429))
async def post_query(permit_id: PermitId, body: QueryBody, request: Request,
                     idempotency_key: str | None = Header(
                         None, alias="Idempotency-Key", min_length=1, max_length=128,
                         description="Makes retries safe: the same key and plan return the "
                         "stored answer without a new charge."),
                     principal: Principal = Depends(require_role(Role.RESEARCHER))
                     ) -> dict[str, Any]:
    """Answer a DP query. The work runs in a worker thread; the answer-time padding (every
    answer that touched data, and every failure after it) is awaited here, holding no thread.
    """
    started = time.monotonic()
    bucket = get_state(request).settings.dp_answer_time_bucket_seconds
    try:
        result: dict[str, Any] = await run_in_threadpool(
            _post_query, permit_id, body, request, idempotency_key, principal)
    except QueryFailed:
        await asyncio.sleep(padding_left(started, bucket))
        raise
    if not result.get("dry_run") and not result.get("replayed"):
        await asyncio.sleep(padding_left(started, bucket))
    return result


def _post_query(permit_id: str, body: QueryBody, request: Request,
                idempotency_key: str | None, principal: Principal) -> dict[str, Any]:
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 128:
        raise InvalidInput("Idempotency-Key must be 1 to 128 characters.")
    limits, key = _admit(request, principal, permit_id, "dp.query", body.sql, body.dry_run)
    try:
        terms = _checked(request, principal, permit_id, "dp.query", authorise)
        state = get_state(request)
        caller = Caller(actor=principal.actor, role=principal.primary_role(),
                        request_id=getattr(request.state, "request_id", None))
        req = QueryRequest(sql=body.sql, epsilon=body.epsilon, delta=body.delta,
                           dry_run=body.dry_run, dataset=body.dataset,
                           max_rows_per_person=body.max_rows_per_person,
                           max_groups_per_person=body.max_groups_per_person,
                           idempotency_key=idempotency_key)
        try:
            return run_query(state.db, state.settings, terms, caller, req, _opener(request),
                             limits, pad=False)
        except SPEError as err:  # run_query audits every refusal and failure itself
            err.audited = True
            raise
    finally:
        limits.leave(key)


@router.get(
    "/v1/permits/{permit_id}/budget", name="dp.budget", operation_id="getBudget",
    summary="Read a permit's privacy budget",
    description="Total, spent and remaining epsilon and delta. Readable by the researchers "
    "the permit names (while named), by the issuing access body and by hospital admins, "
    "whatever the permit's status; 404 for anyone else. 429 over the token's rate limit.",
    response_model=BudgetStatus,
    responses=problem_responses(401, 403, 404, 422, 429))
def get_budget(permit_id: PermitId, request: Request,
               principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    limits, key = _admit(request, principal, permit_id, "dp.budget")
    try:
        terms = _checked(request, principal, permit_id, "dp.budget", authorise_budget_read)
        actor = principal.actor if Role.RESEARCHER in principal.roles else None
        return budget_status(get_state(request).db, terms, actor)
    finally:
        limits.leave(key)


@router.get(
    "/v1/permits/{permit_id}/budget/charges", name="dp.budget",
    operation_id="listBudgetCharges", summary="List a permit's recent DP queries and their cost",
    description="The newest 50 charges to the permit's privacy budget, newest first: when, "
    "the epsilon and delta each cost, and its state (released, failed and refunded, or "
    "reserved while running). No SQL text and no person. Readable by whoever may read the "
    "budget; 404 for anyone else. 429 over the token's rate limit.",
    response_model=BudgetCharges,
    responses=problem_responses(401, 403, 404, 422, 429))
def get_budget_charges(permit_id: PermitId, request: Request,
                       principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    limits, key = _admit(request, principal, permit_id, "dp.budget")
    try:
        terms = _checked(request, principal, permit_id, "dp.budget", authorise_budget_read)
        return budget_charges(get_state(request).db, terms)
    finally:
        limits.leave(key)
