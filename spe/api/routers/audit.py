"""``/v1/audit``: reading the audit log, and what access bodies need to hold the SPE to it.

Contract
--------
* ``GET /v1/audit``: entries with filters (action, actor, permit, outcome, time range) and
  cursor pagination (``next_cursor`` is the last entry's sequence number; pass it as
  ``cursor``). Hospital admins see every entry; an access body sees the entries of the permits
  it issued; a researcher (logged in, not a workspace token) sees the entries of their own
  actions. The read itself is audited (the filters, never the entries).
* ``GET /v1/audit/keys``: the public checkpoint keys with their validity.
* ``GET /v1/audit/checkpoints`` (``after_size``), ``GET /v1/audit/checkpoints/latest`` and
  ``POST /v1/audit/checkpoints`` (sign one now; the last one is returned when the log has not
  grown): signed checkpoints for access bodies, hospital admins and operators to keep.
* ``GET /v1/audit/consistency?first=&second=``: RFC 9162 consistency proof between two sizes.
* ``GET /v1/audit/permits/{permit_id}/proofs?size=``: one permit's entries up to the checkpoint
  of that size, each with its inclusion proof, and the permit's leaf in the checkpoint's
  permits tree (see ``spe.audit.proofs``); for the issuing access body and hospital admins
  (anyone else: 404). ``spe audit verify-remote`` checks the answer.
* Checkpoints are also signed every ``audit_checkpoint_interval_seconds``, and the alert rules
  (``spe.audit.alerts``) run every ``audit_alert_interval_seconds``, by background threads
  started with the app. Admins list alerts with ``GET /v1/audit?action=audit.alert``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from permits.models import Permit
from spe.api.deps import AppStateDep, IsoDateTime, PermitId
from spe.api.problems import problem_responses
from spe.api.routing import AuditedRoute
from spe.api.state import AppState, StateKey
from spe.audit import AuditAction, AuditEvent, Outcome, alerts, record
from spe.audit.checkpoints import Checkpoint, CheckpointLog, KeyStore, LogTampered
from spe.audit.models import AuditEntry
from spe.audit.proofs import (
    consistency,
    create_checkpoint,
    current_size,
    entry_json,
    permit_bundle,
)
from spe.audit.writer import ROW_COLUMNS
from spe.auth.deps import require_role
from spe.auth.principal import Principal, Role
from spe.errors import Conflict, Forbidden, InvalidInput, NotFound

logger = logging.getLogger("spe.audit")

_readers = require_role(Role.HOSPITAL_ADMIN, Role.ACCESS_BODY, Role.RESEARCHER)
_holders = require_role(Role.HOSPITAL_ADMIN, Role.ACCESS_BODY, Role.OPERATOR)
_provers = require_role(Role.HOSPITAL_ADMIN, Role.ACCESS_BODY)
Reader = Annotated[Principal, Depends(_readers)]
Holder = Annotated[Principal, Depends(_holders)]
Prover = Annotated[Principal, Depends(_provers)]


class AuditEntryPublic(BaseModel):
    seq: int
    time: str
    actor: str
    role: str | None
    permit_id: str | None
    action: str
    target: str | None
    outcome: str
    reason: str | None
    request_id: str
    details: dict[str, Any]
    salt: str | None = None
    permit_seq: int | None = None
    prev_hash: str
    entry_hash: str


class AuditPage(BaseModel):
    items: list[AuditEntryPublic]
    next_cursor: int | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page.")


class CheckpointPublic(BaseModel):
    origin: str
    size: int
    chain_head: str
    root: str
    permits: int
    permits_root: str
    time: str
    key_id: str
    signature: str
    version: int


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointPublic]


class PublicKeyPublic(BaseModel):
    key_id: str
    public_key: str = Field(description="Ed25519 public key, base64 of the 32 raw bytes")
    valid_from: str
    valid_until: str | None
    algorithm: str


class KeyList(BaseModel):
    keys: list[PublicKeyPublic]


class ConsistencyProof(BaseModel):
    first: int
    second: int
    proof: list[str]


class PermitLeaf(BaseModel):
    permit_id: str
    count: int
    last_seq: int
    index: int
    path: list[str]


class ProvenEntry(AuditEntryPublic):
    inclusion: list[str]


class PermitProofs(BaseModel):
    checkpoint: CheckpointPublic
    permit_id: str
    permit: PermitLeaf | None
    entries: list[ProvenEntry]


def _stores(state: AppState) -> tuple[KeyStore, CheckpointLog]:
    return KeyStore(state.settings.data_dir), CheckpointLog(state.settings.data_dir)


def _audit(state: AppState, principal: Principal, action: AuditAction,
           permit_id: str | None = None, details: dict[str, Any] | None = None) -> None:
    with state.db.write() as session:
        record(session, AuditEvent(action=action, actor=principal.actor,
                                   role=principal.primary_role(), permit_id=permit_id,
                                   target=permit_id, details=details or {}))


def sign_checkpoint(state: AppState, actor: str = "system", role: str | None = "operator"
                    ) -> Checkpoint:
    """Sign a checkpoint now (unless the log has not grown since the last one); audited."""
    keys, log = _stores(state)
    with log.locked(), state.db.read() as session:  # the snapshot is taken under the lock
        last = log.last()
        if last is not None and current_size(session) == last.size:
            return last
        try:
            cp = create_checkpoint(session, keys, log, state.settings.api_base_url)
        except LogTampered as exc:
            reason = str(exc)
            cp = None
    with state.db.write() as session:
        if cp is None:
            record(session, AuditEvent(action=AuditAction.AUDIT_CHECKPOINT, actor=actor,
                                       role=role, outcome=Outcome.FAILURE,
                                       reason="the log no longer extends the last checkpoint",
                                       details={"problem": reason[:500]}))
        else:
            record(session, AuditEvent(action=AuditAction.AUDIT_CHECKPOINT, actor=actor,
                                       role=role, details={"size": cp.size, "root": cp.root,
                                                           "key_id": cp.key_id}))
    if cp is None:
        logger.error("audit log contradicts its last checkpoint: not signed")
        raise Conflict("The audit log no longer extends its last signed checkpoint; "
                       "no checkpoint was signed. This is recorded as an incident.")
    return cp


def scan_alerts(state: AppState) -> None:
    """Run the alert rules over the entries recorded since the last scan."""
    s = state.settings
    alerts.scan(state.db, s.data_dir, alerts.Policy(
        refusals=s.audit_alert_refusals, repeats=s.audit_alert_repeats,
        window_seconds=s.audit_alert_window_seconds),
        webhook_url=s.audit_alert_webhook_url, syslog_address=s.audit_alert_syslog)


class CheckpointScheduler:
    """Runs ``task`` (default: sign a checkpoint when the log has grown) every ``interval``
    seconds."""

    def __init__(self, state: AppState, interval: float,
                 task: Callable[[], object] | None = None) -> None:
        self.state, self.interval = state, interval
        self.task = task or (lambda: sign_checkpoint(state))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="audit-checkpoints",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.task()
            except Exception:
                logger.exception("scheduled audit task failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


SCHEDULER: StateKey[CheckpointScheduler] = StateKey("audit.checkpoint_scheduler")
ALERTS: StateKey[CheckpointScheduler] = StateKey("audit.alert_scheduler")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.spe
    settings = state.settings
    scheduler = state.get_or_create(SCHEDULER, lambda: CheckpointScheduler(
        state, settings.audit_checkpoint_interval_seconds))
    alert_scheduler = state.get_or_create(ALERTS, lambda: CheckpointScheduler(
        state, settings.audit_alert_interval_seconds, task=lambda: scan_alerts(state)))
    scheduler.start()
    alert_scheduler.start()
    try:
        yield
    finally:
        scheduler.stop()
        alert_scheduler.stop()


router = APIRouter(route_class=AuditedRoute, tags=["audit"], lifespan=lifespan)


def _owned_permits(state: AppState, access_body: str) -> list[str]:
    with state.db.read() as session:
        return [str(p) for p in session.execute(
            select(Permit.id).where(Permit.access_body == access_body)).scalars()]


@router.get("/v1/audit", name=AuditAction.AUDIT_READ.value, response_model=AuditPage)
def read_audit(
    state: AppStateDep, principal: Reader,
    action: Annotated[str | None, Query(max_length=64)] = None,
    actor: Annotated[str | None, Query(max_length=255)] = None,
    permit_id: Annotated[str | None, Query(max_length=64)] = None,
    outcome: Annotated[Literal["success", "refused", "failure"] | None, Query()] = None,
    since: IsoDateTime | None = None,
    until: IsoDateTime | None = None,
    cursor: Annotated[int, Query(ge=0, le=2**62,
                                 description="next_cursor of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditPage:
    """Audit entries visible to the caller, oldest first."""
    query = select(*ROW_COLUMNS).where(AuditEntry.seq > cursor)
    if Role.HOSPITAL_ADMIN in principal.roles and principal.kind in ("user", "system"):
        scope = "all"
    elif Role.ACCESS_BODY in principal.roles and principal.access_body:
        scope = "access_body"
        query = query.where(AuditEntry.permit_id.in_(
            _owned_permits(state, principal.access_body) or [""]))
    elif Role.RESEARCHER in principal.roles and principal.kind == "user":
        scope = "own"
        query = query.where(AuditEntry.actor == principal.username)
    else:
        raise Forbidden("Reading the audit log needs a hospital admin, an access body or a "
                        "researcher's own login (not a workspace token).")
    for column, value in ((AuditEntry.action, action), (AuditEntry.actor, actor),
                          (AuditEntry.permit_id, permit_id), (AuditEntry.outcome, outcome)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        if since.tzinfo is None:
            raise InvalidInput("since must carry a time zone (e.g. 2026-01-01T00:00:00Z).")
        query = query.where(AuditEntry.time >= since)
    if until is not None:
        if until.tzinfo is None:
            raise InvalidInput("until must carry a time zone (e.g. 2026-01-01T00:00:00Z).")
        query = query.where(AuditEntry.time < until)
    with state.db.read() as session:
        rows = session.execute(query.order_by(AuditEntry.seq).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [AuditEntryPublic(**entry_json(row)) for row in rows]
    _audit(state, principal, AuditAction.AUDIT_READ, details={
        "scope": scope, "returned": len(items), "cursor": cursor,
        "filters": {k: v for k, v in (("action", action), ("actor", actor),
                                      ("permit_id", permit_id), ("outcome", outcome))
                    if v is not None}})
    return AuditPage(items=items, next_cursor=items[-1].seq if more and items else None)


@router.get("/v1/audit/keys", name=AuditAction.AUDIT_KEYS.value, response_model=KeyList)
def audit_keys(state: AppStateDep, principal: Holder) -> KeyList:
    """Public checkpoint keys with their validity (an earlier key signs older checkpoints)."""
    keys, _ = _stores(state)
    return KeyList(keys=[PublicKeyPublic(**vars(k)) for k in keys.public_keys()])


@router.get("/v1/audit/checkpoints", name=AuditAction.AUDIT_CHECKPOINTS.value,
            response_model=CheckpointList)
def list_checkpoints(state: AppStateDep, principal: Holder,
                     after_size: Annotated[int, Query(ge=0, le=2**62)] = 0,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> CheckpointList:
    """Signed checkpoints of more than ``after_size`` entries, oldest first."""
    _, log = _stores(state)
    found = [cp for cp in log.all() if cp.size > after_size][:limit]
    return CheckpointList(checkpoints=[CheckpointPublic(**cp.to_json()) for cp in found])


@router.get("/v1/audit/checkpoints/latest", name=AuditAction.AUDIT_CHECKPOINTS.value,
            response_model=CheckpointPublic, responses=problem_responses(404))
def latest_checkpoint(state: AppStateDep, principal: Holder) -> CheckpointPublic:
    """The newest signed checkpoint."""
    _, log = _stores(state)
    last = log.last()
    if last is None:
        raise NotFound("No checkpoint has been signed yet: POST /v1/audit/checkpoints.")
    return CheckpointPublic(**last.to_json())


@router.post("/v1/audit/checkpoints", name=AuditAction.AUDIT_CHECKPOINT.value,
             response_model=CheckpointPublic, responses=problem_responses(409))
def new_checkpoint(state: AppStateDep, principal: Holder) -> CheckpointPublic:
    """Sign a checkpoint of the log as it is now (the last one when the log has not grown)."""
    cp = sign_checkpoint(state, principal.actor, principal.primary_role())
    return CheckpointPublic(**cp.to_json())


@router.get("/v1/audit/consistency", name=AuditAction.AUDIT_CONSISTENCY.value,
            response_model=ConsistencyProof)
def consistency_proof(state: AppStateDep, principal: Holder,
                      first: Annotated[int, Query(ge=0, le=2**62)],
                      second: Annotated[int, Query(ge=0, le=2**62)]) -> ConsistencyProof:
    """RFC 9162 consistency proof that the log of ``second`` entries extends ``first``."""
    with state.db.read() as session:
        if not first <= second <= current_size(session):
            raise InvalidInput("first and second must satisfy first <= second <= log size.")
        proof = consistency(session, first, second, state.settings.data_dir)
    return ConsistencyProof(first=first, second=second, proof=proof)


@router.get("/v1/audit/permits/{permit_id}/proofs", name=AuditAction.AUDIT_PROOF.value,
            response_model=PermitProofs, responses=problem_responses(409))
def permit_proofs(state: AppStateDep, principal: Prover, permit_id: PermitId,
                  size: Annotated[int, Query(ge=0, le=2**62,
                                             description="size of a signed checkpoint")]
                  ) -> PermitProofs:
    """One permit's entries up to a signed checkpoint, each with its inclusion proof."""
    with state.db.read() as session:
        owner = session.execute(select(Permit.access_body)
                                .where(Permit.id == permit_id)).scalar()
    admin = Role.HOSPITAL_ADMIN in principal.roles and principal.kind in ("user", "system")
    if owner is None or not (admin or (Role.ACCESS_BODY in principal.roles
                                       and principal.access_body == owner)):
        raise NotFound(f"No permit {permit_id} visible to the caller.")
    _, log = _stores(state)
    cp = log.at_size(size)
    if cp is None:
        raise NotFound("No signed checkpoint of that size.")
    with state.db.read() as session:
        try:
            bundle = permit_bundle(session, cp, permit_id, state.settings.data_dir)
        except LogTampered:
            raise Conflict("The audit log no longer matches that checkpoint.") from None
    _audit(state, principal, AuditAction.AUDIT_PROOF, permit_id,
           {"size": size, "entries": len(bundle["entries"])})
    return PermitProofs(**bundle)
