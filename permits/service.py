"""The permit service: business rules over the control-plane database.

Contract
--------
* Every change is one database transaction that also writes the new ``permit_versions`` row,
  the ``spe.audit`` entry (who, what, before/after of the changed fields) and the
  ``permit_events`` outbox row; the event is published in-process after the commit.
  Suspend, revoke and expire also revoke the permit's workspace tokens in that transaction;
  an amendment that removes persons revokes theirs.
* Keycloak calls (``permits.groups.PermitGroups``) happen outside the transaction: checks and
  provisioning *before* it (a Keycloak outage is a 503 and nothing is written), removal
  *after* it (a revocation is never blocked by Keycloak; the sweeper retries the removal).
  A failed transaction after a Keycloak change is compensated (group removed, or re-synced to
  what the database says).
* Transitions follow ``permits.states`` (409 with the reason otherwise); amend needs the
  current ETag (428 missing, 412 stale), checked again under the row lock, so concurrent
  amends with one ETag have exactly one winner.
* Authorisation follows ``permits.policy``; a permit the caller may not see is 404.
* ``get_terms(session, permit_id)`` gives other packages the newest terms with the effective
  status. Importing this module registers the permit checker for workspace tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, TypeAdapter, ValidationError
from sqlalchemy import and_, bindparam, delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from permits import catalog, events, policy
from permits.errors import PreconditionRequired
from permits.events import EventKind, PermitEventRecord
from permits.groups import PermitGroups
from permits.models import IdempotencyRecord, Permit, PermitDataset, PermitPerson, PermitVersion
from permits.schemas import (
    MAX_EXTENSION,
    MAX_PERMIT_DURATION,
    PermitContent,
    PermitCreate,
    PermitEventPage,
    PermitEventPublic,
    PermitPage,
    PermitPublic,
    PermitUpdate,
    PermitVersionPublic,
)
from permits.snapshots import read_snapshot
from permits.states import Action, check, effective_status, next_status
from permits.terms import (
    AccessMode,
    ComputeQuota,
    DatasetGrant,
    ExportPolicy,
    PermitStatus,
    PermitTerms,
    PrivacyBudget,
)
from spe.audit import AuditEvent, record
from spe.audit.incident import is_frozen
from spe.auth.permit_checks import register_permit_checker
from spe.auth.principal import SYSTEM, Principal
from spe.auth.workspace_tokens import revoke_permit_tokens, revoke_person_tokens
from spe.db import Database
from spe.db.base import utcnow
from spe.errors import Conflict, InvalidInput, NotFound, PreconditionFailed, ServiceUnavailable

logger = logging.getLogger("permits.service")

_EVENT_OF: dict[Action, EventKind] = {
    Action.ISSUE: EventKind.ISSUED, Action.AMEND: EventKind.AMENDED,
    Action.EXTEND: EventKind.EXTENDED, Action.SUSPEND: EventKind.SUSPENDED,
    Action.RESUME: EventKind.RESUMED, Action.REVOKE: EventKind.REVOKED,
    Action.EXPIRE: EventKind.EXPIRED,
}
_STOPS_TOKENS = frozenset({Action.SUSPEND, Action.REVOKE, Action.EXPIRE})
_REMOVES_GROUP = frozenset({Action.REVOKE, Action.EXPIRE})
MAX_PAGE = 200
#: Largest sequence number a cursor may carry (the database's BIGINT).
MAX_SEQ = 2**63 - 1
_DATETIME: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)


# Helpers ------------------------------------------------------------------------------------

def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def make_etag(permit_id: str, version: int, status: str, snapshot: dict[str, Any]) -> str:
    digest = hashlib.sha256(_canonical([permit_id, version, status, snapshot]).encode())
    return f'"{permit_id[:8]}-v{version}-{digest.hexdigest()[:16]}"'


def etag_matches(header: str, etag: str) -> bool:
    """Strong comparison of an If-Match header (a list of entity tags) with ``etag``."""
    return any(tag.strip() == etag for tag in header.split(","))


def _validation_errors(exc: ValidationError, prefix: Sequence[str] = ("body",)
                       ) -> list[dict[str, Any]]:
    return [{"loc": [*prefix, *map(str, e["loc"])], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()]


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(_canonical({"s": seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        seq = json.loads(raw)["s"]
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
            raise ValueError
        return seq
    except (ValueError, KeyError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise InvalidInput("The cursor is not one this API returned.",
                           errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}]) from exc


def _load(session: Session, permit_id: str, *, lock: bool = False
          ) -> tuple[Permit, PermitVersion] | None:
    query = select(Permit).where(Permit.id == permit_id)
    if lock:
        query = query.with_for_update()
    permit = session.execute(query).scalar_one_or_none()
    if permit is None:
        return None
    version = session.get(PermitVersion, (permit.id, permit.version))
    assert version is not None
    return permit, version


def _effective(permit: Permit, now: datetime) -> PermitStatus:
    return effective_status(permit.status, permit.valid_from, permit.valid_until, now)


def to_public(permit: Permit, snapshot: dict[str, Any], now: datetime) -> PermitPublic:
    snapshot = read_snapshot(snapshot)
    return PermitPublic.model_validate({
        **snapshot, "id": permit.id, "access_body": permit.access_body,
        "status": _effective(permit, now), "version": permit.version, "etag": permit.etag,
        "extended": permit.extended, "created_at": permit.created_at,
        "updated_at": permit.updated_at,
    })


#: The permit row alone (the read path's per-request query: status, version, ETag, owner).
_HEAD_QUERY = (
    select(Permit.id, Permit.access_body, Permit.status, Permit.version, Permit.etag,
           Permit.valid_from, Permit.valid_until, Permit.extended, Permit.created_at,
           Permit.updated_at)
    .where(Permit.id == bindparam("permit_id"))
)
_SNAPSHOT_QUERY = (
    select(PermitVersion.snapshot)
    .where(PermitVersion.permit_id == bindparam("permit_id"),
           PermitVersion.version == bindparam("version"))
)
#: The fields of PermitPublic that come from the permit row, not from the version snapshot.
_HEAD_FIELDS = ("id", "access_body", "status", "version", "etag", "extended", "created_at",
                "updated_at")


@dataclass(frozen=True)
class VersionSnapshot:
    """One stored version's content as the read path uses it: its persons and its JSON (read
    through ``read_snapshot``, without the row's fields), serialised once."""

    persons: frozenset[str]
    json_prefix: bytes  # the JSON object without its closing brace


def _version_snapshot(raw: dict[str, Any] | str | bytes) -> VersionSnapshot:
    snapshot = read_snapshot(json.loads(raw) if isinstance(raw, str | bytes) else raw)
    content = {k: v for k, v in snapshot.items() if k not in _HEAD_FIELDS}
    encoded = json.dumps(content, separators=(",", ":")).encode()
    return VersionSnapshot(frozenset(snapshot["persons"]),
                           encoded[:-1] + b"," if content else b"{")


class VersionCache:
    """Snapshots of stored permit versions by (permit id, version), at most ``max_entries``
    (oldest dropped first).

    Safe because what it holds never changes: ``permit_versions`` is append-only (a database
    trigger refuses UPDATE), a change writes a new version, and the read path looks the
    permit row up in the database on every request and takes the snapshot of the version
    that row names. Status, validity, ETag and owner are never cached; the persons who may
    read are those of the current version, so a suspension, revocation or removed person is
    seen by the next read in every process.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[str, int], VersionSnapshot] = {}
        self._lock = threading.Lock()

    def get(self, permit_id: str, version: int) -> VersionSnapshot | None:
        return self._entries.get((permit_id, version))

    def put(self, permit_id: str, version: int, snapshot: VersionSnapshot) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[(permit_id, version)] = snapshot


@dataclass(frozen=True)
class PermitView:
    """A permit as read for display (the fast read path: the stored snapshot is not
    re-validated). ``json_bytes()`` and ``document`` have exactly the content of
    ``PermitPublic`` in JSON mode; ``document`` is a fresh copy on each access."""

    head: dict[str, Any]
    snapshot: VersionSnapshot

    @property
    def etag(self) -> str:
        return str(self.head["etag"])

    @property
    def persons(self) -> frozenset[str]:
        return self.snapshot.persons

    @property
    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.json_bytes())
        return doc

    def public(self) -> PermitPublic:
        return PermitPublic.model_validate(self.document)

    def json_bytes(self) -> bytes:
        head = json.dumps(self.head, separators=(",", ":")).encode()
        return self.snapshot.json_prefix + head[1:]


def _utc(value: datetime | str) -> datetime:
    """A driver's timestamp as an aware UTC datetime, as ``UTCDateTime`` reads it (SQLite
    returns the stored text, naive UTC; PostgreSQL an aware datetime)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _head(row: Sequence[Any], now: datetime) -> dict[str, Any]:
    """The row fields of PermitPublic (JSON mode) from a ``_HEAD_QUERY`` row as the driver
    returns it (``Database.read_one``), with the effective status at ``now``."""
    (pid, access_body, status, version, etag, valid_from, valid_until, extended, created,
     updated) = row
    return {
        "id": pid, "access_body": access_body,
        "status": effective_status(status, _utc(valid_from), _utc(valid_until), now).value,
        "version": version, "etag": etag, "extended": bool(extended),
        "created_at": _DATETIME.dump_python(_utc(created), mode="json"),
        "updated_at": _DATETIME.dump_python(_utc(updated), mode="json"),
    }


def terms_of(permit: Permit, snapshot: dict[str, Any], now: datetime) -> PermitTerms:
    snapshot = read_snapshot(snapshot)
    budget = snapshot["privacy_budget"]
    export = snapshot["export_policy"]
    return PermitTerms(
        permit_id=permit.id,
        version=permit.version,
        access_body=permit.access_body,
        status=_effective(permit, now),
        valid_from=permit.valid_from,
        valid_until=permit.valid_until,
        persons=frozenset(snapshot["persons"]),
        access_mode=AccessMode(snapshot["access_mode"]),
        datasets=tuple(
            DatasetGrant(dataset=g["dataset"],
                         tables={t: frozenset(c) for t, c in g["tables"].items()})
            for g in snapshot["datasets"]
        ),
        budget=PrivacyBudget(
            epsilon=float(budget["epsilon"]), delta=float(budget["delta"]),
            max_epsilon_per_query=float(budget["max_epsilon_per_query"]),
            per_person_epsilon=(None if budget.get("per_person_epsilon") is None
                                else float(budget["per_person_epsilon"])),
        ),
        export=ExportPolicy(min_cell_count=int(export["min_cell_count"]),
                            allowed_kinds=frozenset(export["allowed_kinds"]),
                            reviewers=int(export["reviewers"]),
                            max_files=export.get("max_files"),
                            max_bytes=export.get("max_bytes"),
                            max_rows=export.get("max_rows"),
                            dominance_k=float(export.get("dominance_k", 0.9)),
                            p_percent=float(export.get("p_percent", 0.1))),
        compute=ComputeQuota(**snapshot["compute_quota"]),
        purposes=frozenset(snapshot["purposes"]),
        retention_days=int(snapshot["retention_days"]),
    )


def get_terms(session: Session, permit_id: str, now: datetime | None = None) -> PermitTerms:
    """The newest terms of a permit with its effective status; NotFound when absent."""
    loaded = _load(session, permit_id)
    if loaded is None:
        raise NotFound(f"No permit {permit_id}.")
    permit, version = loaded
    terms = terms_of(permit, version.snapshot, now or utcnow())
    if is_frozen(session, permit_id):  # the incident switch: refused whatever the status
        terms = replace(terms, frozen=True)
    return terms


def permit_is_active(session: Session, permit_id: str) -> bool:
    """The permit checker registered for workspace tokens: effective status is active."""
    row = session.execute(
        select(Permit.status, Permit.valid_from, Permit.valid_until).where(Permit.id == permit_id)
    ).one_or_none()
    if row is None:
        return False
    return effective_status(row[0], row[1], row[2], utcnow()) is PermitStatus.ACTIVE


register_permit_checker(permit_is_active)


def _status_filter(status: PermitStatus, now: datetime) -> ColumnElement[bool]:
    live = Permit.status.in_([PermitStatus.ACTIVE.value, PermitStatus.SUSPENDED.value])
    if status is PermitStatus.EXPIRED:
        return or_(Permit.status == status.value, and_(live, Permit.valid_until <= now))
    if status is PermitStatus.REVOKED:
        return Permit.status == status.value
    if status is PermitStatus.SUSPENDED:
        return and_(Permit.status == status.value, Permit.valid_until > now)
    if status is PermitStatus.PENDING:
        return and_(Permit.status == "active", Permit.valid_from > now, Permit.valid_until > now)
    return and_(Permit.status == "active", Permit.valid_from <= now, Permit.valid_until > now)


@dataclass(frozen=True)
class IssueResult:
    """Outcome of an issue request: the JSON body to return, and whether it was a replay."""

    permit_id: str
    body: dict[str, Any]
    etag: str
    status_code: int = 201
    replayed: bool = False


class _Replay(Exception):
    """Control flow inside issue(): the key was used meanwhile; never escapes."""

    def __init__(self, result: IssueResult) -> None:
        self.result = result


# The service --------------------------------------------------------------------------------

class PermitService:
    """Permit use cases for one database. ``clock`` is injectable so tests can move time."""

    def __init__(self, db: Database, groups: PermitGroups | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.groups = groups
        self.clock = clock
        self.versions_cache = VersionCache()

    # Keycloak ---------------------------------------------------------------------------
    def _kc(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ServiceUnavailable:
            raise
        except Exception as exc:
            logger.warning("keycloak call failed", extra={"fields": {
                "call": what, "error": type(exc).__name__}})
            raise ServiceUnavailable(
                f"The identity provider (Keycloak) could not be reached to {what}; nothing was "
                "changed. Try again later.") from exc

    def _check_persons(self, persons: Sequence[str]) -> None:
        if self.groups is None:
            return
        groups = self.groups
        missing = self._kc("check the persons", lambda: groups.missing_users(list(persons)))
        if missing:
            index = {name: i for i, name in enumerate(persons)}
            raise InvalidInput(
                "Some persons are not known to the identity provider: "
                + ", ".join(sorted(missing)) + ".",
                errors=[{"loc": ["body", "persons", str(index.get(m, 0))],
                         "msg": f"unknown person {m!r}: no such Keycloak user"}
                        for m in sorted(missing)])

    def _compensate(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - best effort; the sweeper/resync retries
            logger.error("keycloak compensation failed", extra={"fields": {
                "call": what, "error": type(exc).__name__}})

    def _resync(self, permit_id: str) -> None:
        """Make the permit's group match what the database says (after a failed change)."""
        if self.groups is None:
            return
        groups = self.groups
        with self.db.read() as s:
            loaded = _load(s, permit_id)
        if loaded is None or loaded[0].group_state != "present":
            # Absent, or revoked/expired meanwhile (a racing revocation removed the group
            # after our sync re-filled it): the group must not exist.
            self._compensate("remove group", lambda: groups.remove(permit_id))
        else:
            persons = list(loaded[1].snapshot["persons"])
            self._compensate("sync group", lambda: groups.sync(permit_id, persons))

    def remove_group(self, permit_id: str) -> bool:
        """Remove a revoked/expired permit's group; True when done (else retried later)."""
        if self.groups is not None:
            groups = self.groups
            try:
                groups.remove(permit_id)
            except Exception as exc:  # noqa: BLE001 - retried by the expiry sweeper
                logger.warning("keycloak group removal failed; will retry", extra={"fields": {
                    "permit_id": permit_id, "error": type(exc).__name__}})
                return False
        with self.db.write() as s:
            s.execute(update(Permit).where(Permit.id == permit_id)
                      .values(group_state="removed"))
        return True

    # Shared write steps -----------------------------------------------------------------
    def _write_version(self, s: Session, permit: Permit, *, action: Action,
                       principal: Principal, snapshot: dict[str, Any],
                       before: dict[str, Any], changed: list[str], reason: str | None,
                       now: datetime) -> PermitEventRecord:
        """New version + permit row + audit + (tokens) + event, in ``s``'s transaction."""
        old_status = permit.status
        new_status = next_status(action, PermitStatus(permit.status))
        version = permit.version + 1 if action is not Action.ISSUE else 1
        s.add(PermitVersion(permit_id=permit.id, version=version, change=_EVENT_OF[action].value,
                            status=new_status.value, snapshot=snapshot, changed_fields=changed,
                            actor=principal.actor, reason=reason, time=now))
        permit.version = version
        permit.status = new_status.value
        permit.etag = make_etag(permit.id, version, new_status.value, snapshot)
        permit.updated_at = now
        if action in _REMOVES_GROUP:
            permit.group_state = "pending_removal"
        s.flush()
        after = {k: snapshot.get(k) for k in changed if k in snapshot}
        if old_status != new_status.value or action is Action.ISSUE:
            before = {**before, "status": None if action is Action.ISSUE else old_status}
            after["status"] = new_status.value
        record(s, AuditEvent(
            action=f"permit.{action.value}", actor=principal.actor,
            role=principal.primary_role(), permit_id=permit.id, target=permit.id,
            reason=reason,
            details={"access_body": permit.access_body, "reference": permit.reference,
                     "version": version, "changed_fields": changed, "before": before,
                     "after": after}))
        if action in _STOPS_TOKENS:
            revoke_permit_tokens(s, permit.id, actor=principal,
                                 reason=f"permit {_EVENT_OF[action].value}")
        return events.append(s, permit_id=permit.id, kind=_EVENT_OF[action], version=version,
                             status=new_status.value, time=now)

    @staticmethod
    def _write_index(s: Session, permit_id: str, snapshot: dict[str, Any]) -> None:
        s.execute(delete(PermitPerson).where(PermitPerson.permit_id == permit_id))
        s.execute(delete(PermitDataset).where(PermitDataset.permit_id == permit_id))
        s.add_all([PermitPerson(permit_id=permit_id, username=p) for p in snapshot["persons"]])
        s.add_all([PermitDataset(permit_id=permit_id, dataset=g["dataset"])
                   for g in snapshot["datasets"]])

    @staticmethod
    def _window_errors(valid_from: datetime, valid_until: datetime, now: datetime,
                       *, limit: Any = MAX_PERMIT_DURATION) -> list[dict[str, Any]]:
        errors = []
        if valid_until <= now:
            errors.append({"loc": ["body", "valid_until"], "msg": "must be in the future"})
        if valid_until - valid_from > limit:
            errors.append({"loc": ["body", "valid_until"],
                           "msg": "a permit lasts at most 10 years (EHDS Art 68(12))"})
        return errors

    # Issue ------------------------------------------------------------------------------
    @staticmethod
    def _replay(s: Session, access_body: str, key: str, request_hash: str
                ) -> IssueResult | None:
        rec = s.get(IdempotencyRecord, (access_body, key))
        if rec is None:
            return None
        if rec.request_hash != request_hash:
            raise InvalidInput(
                "This Idempotency-Key was already used with a different request body; use a "
                "new key for a new permit.",
                errors=[{"loc": ["header", "Idempotency-Key"], "msg": "key reused with a "
                         "different body"}])
        return IssueResult(permit_id=rec.permit_id, body=rec.response,
                           etag=str(rec.response.get("etag", "")), status_code=rec.status_code,
                           replayed=True)

    def issue(self, principal: Principal, body: PermitCreate, *,
              idempotency_key: str | None = None) -> IssueResult:
        policy.check_manage(principal)
        assert principal.access_body
        body_ab = principal.access_body
        now = self.clock()
        content = body.model_dump(mode="json")
        request_hash = hashlib.sha256(_canonical(content).encode()).hexdigest()
        if idempotency_key:
            with self.db.read() as s:
                replay = self._replay(s, body_ab, idempotency_key, request_hash)
            if replay is not None:
                return replay
        errors = self._window_errors(body.valid_from, body.valid_until, now)
        with self.db.read() as s:
            errors += catalog.check_grants(s, body.datasets)
            duplicate = s.execute(select(Permit.id).where(
                Permit.access_body == body_ab, Permit.reference == body.reference)).first()
            if duplicate and idempotency_key:
                # A first attempt with this key may have committed since the check above.
                replay = self._replay(s, body_ab, idempotency_key, request_hash)
                if replay is not None:
                    return replay
        if errors:
            raise InvalidInput("The permit has invalid fields; see errors.", errors=errors)
        if duplicate:
            raise Conflict(f"This access body already has a permit with reference "
                           f"{body.reference!r}; amend it or use a new reference.")
        self._check_persons(body.persons)
        permit_id = str(uuid.uuid4())
        if self.groups is not None:
            groups = self.groups
            self._kc("create the permit's group",
                     lambda: groups.provision(permit_id, list(body.persons)))
        try:
            result, event = self._issue_tx(principal, body_ab, permit_id, content, body,
                                           idempotency_key, request_hash, now)
        except _Replay as replay:
            self._undo_provision(permit_id)
            return replay.result
        except IntegrityError as exc:
            self._undo_provision(permit_id)
            if idempotency_key:
                with self.db.read() as s:
                    replay_result = self._replay(s, body_ab, idempotency_key, request_hash)
                if replay_result is not None:
                    return replay_result
            raise Conflict(f"This access body already has a permit with reference "
                           f"{body.reference!r}.") from exc
        except BaseException:
            self._undo_provision(permit_id)
            raise
        events.publish([event])
        return result

    def _undo_provision(self, permit_id: str) -> None:
        if self.groups is not None:
            groups = self.groups
            self._compensate("remove group", lambda: groups.remove(permit_id))

    def _issue_tx(self, principal: Principal, access_body: str, permit_id: str,
                  content: dict[str, Any], body: PermitCreate, key: str | None,
                  request_hash: str, now: datetime) -> tuple[IssueResult, PermitEventRecord]:
        with self.db.write() as s:
            if key:
                replay = self._replay(s, access_body, key, request_hash)
                if replay is not None:
                    raise _Replay(replay)
            if s.execute(select(Permit.id).where(Permit.access_body == access_body,
                                                 Permit.reference == body.reference)).first():
                raise Conflict(f"This access body already has a permit with reference "
                               f"{body.reference!r}; amend it or use a new reference.")
            permit = Permit(id=permit_id, access_body=access_body, reference=body.reference,
                            status=PermitStatus.ACTIVE.value, version=0, etag="",
                            valid_from=body.valid_from, valid_until=body.valid_until,
                            extended=False, group_state="present", created_at=now,
                            created_by=principal.actor, updated_at=now)
            s.add(permit)
            s.flush()
            event = self._write_version(s, permit, action=Action.ISSUE, principal=principal,
                                        snapshot=content, before={}, changed=sorted(content),
                                        reason=None, now=now)
            self._write_index(s, permit_id, content)
            public = to_public(permit, content, now).model_dump(mode="json")
            if key:
                s.add(IdempotencyRecord(access_body=access_body, key=key,
                                        request_hash=request_hash, permit_id=permit_id,
                                        status_code=201, response=public, created_at=now))
            s.flush()
        return IssueResult(permit_id=permit_id, body=public, etag=permit.etag), event

    # Amend ------------------------------------------------------------------------------
    def amend(self, principal: Principal, permit_id: str, update_: PermitUpdate,
              if_match: str | None) -> PermitPublic:
        policy.check_manage(principal)
        if not if_match or if_match.strip() == "*":
            raise PreconditionRequired(
                "Amending a permit needs an If-Match header with the permit's current ETag "
                "(from GET /v1/permits/{id}).")
        now = self.clock()
        with self.db.read() as s:
            loaded = _load(s, permit_id)
        if loaded is None:
            raise NotFound(f"No permit {permit_id} visible to the caller.")
        permit, version = loaded
        policy.check_change(principal, permit_id, permit.access_body)
        self._check_fresh(permit, if_match)
        check(Action.AMEND, _effective(permit, now))
        current = version.snapshot
        merged = {**current, **update_.changes()}
        try:
            content = PermitContent.model_validate(merged)
        except ValidationError as exc:
            raise InvalidInput("The amended permit has invalid fields; see errors.",
                               errors=_validation_errors(exc)) from exc
        new = content.model_dump(mode="json")
        changed = sorted(k for k in new if new[k] != current.get(k))
        if not changed:
            return to_public(permit, current, now)
        if "datasets" in changed:
            with self.db.read() as s:
                errors = catalog.check_grants(s, content.datasets)
            if errors:
                raise InvalidInput("The amended permit has invalid fields; see errors.",
                                   errors=errors)
        persons_changed = "persons" in changed
        if persons_changed and self.groups is not None:
            self._check_persons(content.persons)
            groups = self.groups
            self._kc("update the permit's group",
                     lambda: groups.sync(permit_id, list(content.persons)))
        try:
            with self.db.write() as s:
                loaded = _load(s, permit_id, lock=True)
                assert loaded is not None
                permit, version = loaded
                self._check_fresh(permit, if_match)
                check(Action.AMEND, _effective(permit, now))
                event = self._write_version(
                    s, permit, action=Action.AMEND, principal=principal, snapshot=new,
                    before={k: current.get(k) for k in changed}, changed=changed, reason=None,
                    now=now)
                if persons_changed or "datasets" in changed:
                    self._write_index(s, permit_id, new)
                if persons_changed:
                    removed = set(current["persons"]) - set(new["persons"])
                    revoke_person_tokens(s, permit_id, removed, actor=principal)
                public = to_public(permit, new, now)
        except BaseException:
            if persons_changed:
                self._resync(permit_id)
            raise
        events.publish([event])
        return public

    @staticmethod
    def _check_fresh(permit: Permit, if_match: str | None) -> None:
        if if_match is not None and not etag_matches(if_match, permit.etag):
            raise PreconditionFailed(
                "The permit changed since you read it (If-Match does not carry its current "
                "ETag); read it again and retry.")

    # State changes ----------------------------------------------------------------------
    def transition(self, principal: Principal, permit_id: str, action: Action, *,
                   reason: str, if_match: str | None = None,
                   new_valid_until: datetime | None = None) -> PermitPublic:
        """suspend, resume, revoke or extend (``new_valid_until``) a permit."""
        if action not in (Action.SUSPEND, Action.RESUME, Action.REVOKE, Action.EXTEND):
            raise ValueError(f"not a caller transition: {action}")
        policy.check_manage(principal)
        now = self.clock()
        with self.db.write() as s:
            loaded = _load(s, permit_id, lock=True)
            if loaded is None:
                raise NotFound(f"No permit {permit_id} visible to the caller.")
            permit, version = loaded
            policy.check_change(principal, permit_id, permit.access_body)
            self._check_fresh(permit, if_match)
            check(action, _effective(permit, now))
            snapshot = dict(version.snapshot)
            before: dict[str, Any] = {}
            changed: list[str] = []
            if action is Action.EXTEND:
                assert new_valid_until is not None
                self._check_extension(permit, new_valid_until, now)
                before = {"valid_until": snapshot["valid_until"]}
                snapshot["valid_until"] = _DATETIME.dump_python(new_valid_until, mode="json")
                permit.valid_until = new_valid_until
                permit.extended = True
                changed = ["valid_until"]
            event = self._write_version(s, permit, action=action, principal=principal,
                                        snapshot=snapshot, before=before, changed=changed,
                                        reason=reason, now=now)
            public = to_public(permit, snapshot, now)
        if action in _REMOVES_GROUP:
            self.remove_group(permit_id)
        events.publish([event])
        return public

    @staticmethod
    def _check_extension(permit: Permit, new_until: datetime, now: datetime) -> None:
        if permit.extended:
            raise Conflict("Cannot extend this permit: it has already been extended once "
                           "(EHDS Art 68(12) allows one extension).")
        errors = []
        if new_until <= permit.valid_until:
            errors.append({"loc": ["body", "valid_until"],
                           "msg": "must be later than the current valid_until"})
        elif new_until - permit.valid_until > MAX_EXTENSION:
            errors.append({"loc": ["body", "valid_until"],
                           "msg": "an extension lasts at most 10 years (EHDS Art 68(12))"})
        if new_until <= now:
            errors.append({"loc": ["body", "valid_until"], "msg": "must be in the future"})
        if errors:
            raise InvalidInput("The extension is not valid; see errors.", errors=errors)

    # Expiry (called by permits.expiry) --------------------------------------------------
    def expire_due(self) -> list[str]:
        """Record ``expired`` for every permit whose valid_until has passed; retry pending
        group removals. Returns the ids newly expired."""
        now = self.clock()
        with self.db.read() as s:
            due = list(s.execute(select(Permit.id).where(
                Permit.status.in_([PermitStatus.ACTIVE.value, PermitStatus.SUSPENDED.value]),
                Permit.valid_until <= now)).scalars())
        expired: list[str] = []
        published: list[PermitEventRecord] = []
        for permit_id in due:
            with self.db.write() as s:
                loaded = _load(s, permit_id, lock=True)
                if loaded is None:
                    continue
                permit, version = loaded
                if _effective(permit, now) is not PermitStatus.EXPIRED or \
                        permit.status == PermitStatus.EXPIRED.value:
                    continue
                published.append(self._write_version(
                    s, permit, action=Action.EXPIRE, principal=SYSTEM,
                    snapshot=dict(version.snapshot), before={}, changed=[],
                    reason="valid_until reached", now=now))
                expired.append(permit_id)
        events.publish(published)
        with self.db.read() as s:
            pending = list(s.execute(select(Permit.id).where(
                Permit.group_state == "pending_removal")).scalars())
        for permit_id in pending:
            self.remove_group(permit_id)
        return expired

    # Reads ------------------------------------------------------------------------------
    def get(self, principal: Principal, permit_id: str) -> PermitPublic:
        return self.view(principal, permit_id).public()

    def view(self, principal: Principal, permit_id: str) -> PermitView:
        """The permit for display (404 when absent or not visible to the caller)."""
        policy.check_read_permits(principal)
        # The hot read path: the permit row, read fresh on every request with one statement
        # on a pooled driver connection (Database.read_one: no BEGIN/COMMIT, no ORM or result
        # machinery); the snapshot of the version it names is immutable, so it is read once
        # per process (VersionCache). Who may see it is decided on that row and version.
        row = self.db.read_one(_HEAD_QUERY, {"permit_id": permit_id})
        if row is None:
            raise NotFound(f"No permit {permit_id} visible to the caller.")
        head = _head(row, self.clock())
        snapshot = self.versions_cache.get(head["id"], head["version"])
        if snapshot is None:
            stored = self.db.read_one(_SNAPSHOT_QUERY, {"permit_id": head["id"],
                                                        "version": head["version"]})
            if stored is None:  # deleted since the first statement
                raise NotFound(f"No permit {permit_id} visible to the caller.")
            snapshot = _version_snapshot(stored[0])
            self.versions_cache.put(head["id"], head["version"], snapshot)
        policy.check_see(principal, permit_id, head["access_body"], snapshot.persons)
        return PermitView(head, snapshot)

    def versions(self, principal: Principal, permit_id: str) -> list[PermitVersionPublic]:
        policy.check_read_permits(principal)
        with self.db.read() as s:
            loaded = _load(s, permit_id)
            if loaded is None:
                raise NotFound(f"No permit {permit_id} visible to the caller.")
            permit, current = loaded
            policy.check_see(principal, permit_id, permit.access_body,
                             set(current.snapshot["persons"]))
            rows = s.execute(select(PermitVersion).where(PermitVersion.permit_id == permit_id)
                             .order_by(PermitVersion.version)).scalars().all()
        return [PermitVersionPublic(version=r.version, change=r.change,
                                    changed_fields=list(r.changed_fields), actor=r.actor,
                                    time=r.time, reason=r.reason, status=PermitStatus(r.status),
                                    content=PermitContent.model_validate(r.snapshot))
                for r in rows]

    def list_permits(self, principal: Principal, *, status: PermitStatus | None = None,
             dataset: str | None = None, person: str | None = None,
             cursor: str | None = None, limit: int = 50) -> PermitPage:
        scope = policy.list_scope(principal)
        now = self.clock()
        after = decode_cursor(cursor) if cursor else 0
        limit = max(1, min(limit, MAX_PAGE))
        query = select(Permit, PermitVersion.snapshot).join(
            PermitVersion, and_(PermitVersion.permit_id == Permit.id,
                                PermitVersion.version == Permit.version)
        ).where(Permit.seq > after)
        if scope.kind == "access_body":
            query = query.where(Permit.access_body == scope.value)
        elif scope.kind == "person":
            query = query.where(exists().where(PermitPerson.permit_id == Permit.id,
                                               PermitPerson.username == scope.value))
            if scope.permit_id is not None:
                query = query.where(Permit.id == scope.permit_id)
        if status is not None:
            query = query.where(_status_filter(status, now))
        if dataset is not None:
            query = query.where(exists().where(PermitDataset.permit_id == Permit.id,
                                               PermitDataset.dataset == dataset))
        if person is not None:
            query = query.where(exists().where(PermitPerson.permit_id == Permit.id,
                                               PermitPerson.username == person))
        query = query.order_by(Permit.seq).limit(limit + 1)
        with self.db.read() as s:
            rows = s.execute(query).all()
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1][0].seq) if len(rows) > limit else None
        return PermitPage(items=[to_public(p, snap, now) for p, snap in page],
                          next_cursor=next_cursor)

    def event_page(self, principal: Principal, *, after: int = 0, limit: int = 100
               ) -> PermitEventPage:
        policy.check_read_events(principal)
        limit = max(1, min(limit, 1000))
        with self.db.read() as s:
            items = events.poll(s, after, limit)
        return PermitEventPage(
            items=[PermitEventPublic(id=e.id, permit_id=e.permit_id, kind=e.kind.value,
                                     version=e.version, status=PermitStatus(e.status),
                                     time=e.time) for e in items],
            last_id=items[-1].id if items else after)
