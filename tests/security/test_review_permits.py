"""Security review: permits, audit and workspace-token findings, each shown failing first.

Every test here names the attack it stops. They run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from permits.schemas import PermitCreate, PermitUpdate
from permits.service import PermitService, encode_cursor
from permits.states import Action
from spe.audit import AuditEvent, record, verify_chain
from spe.audit.models import AuditEntry
from spe.auth.principal import Principal
from spe.auth.validator import SPETokenValidator
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from spe.errors import Conflict, InvalidInput, NotAuthenticated, PreconditionFailed
from tests.integration.test_permit_service import ADMIN, ALPHA, body, register_dataset

Headers = Callable[[str], dict[str, str]]


# Audit entries whose fields exceed the column sizes ------------------------------------------

def test_oversized_audit_fields_are_still_recorded(db: Database) -> None:
    """An attacker-chosen permit id / target longer than the column must not make the audit
    write fail (PostgreSQL refuses over-long varchar values): the refusal would go unaudited."""
    with db.write() as s:
        entry = record(s, AuditEvent(action="permit.read", actor="a" * 400, role="r" * 100,
                                     permit_id="p" * 300, target="t" * 5000,
                                     request_id="q" * 100, outcome="refused"))
        assert entry.permit_id is not None and len(entry.permit_id) <= 64
    with db.read() as s:
        assert verify_chain(s).ok


@pytest.mark.keycloak
def test_anonymous_refusal_with_long_permit_id_is_audited(api_client: TestClient,
                                                          db: Database) -> None:
    r = api_client.get("/v1/permits/" + "a" * 300)
    assert r.status_code == 401
    with db.read() as s:
        n = s.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "permit.read", AuditEntry.outcome == "refused"))
    assert n == 1


# Integers from the client that overflow the database ---------------------------------------

def test_cursor_beyond_bigint_is_invalid_input(db: Database) -> None:
    """A forged cursor with a huge sequence number gave a 500 (SQLite OverflowError,
    PostgreSQL 'bigint out of range')."""
    svc = PermitService(db)
    with pytest.raises(InvalidInput):
        svc.list_permits(ADMIN, cursor=encode_cursor(10**30))
    forged = base64.urlsafe_b64encode(json.dumps({"s": 2**63}).encode()).decode().rstrip("=")
    with pytest.raises(InvalidInput):
        svc.list_permits(ADMIN, cursor=forged)


@pytest.mark.keycloak
def test_event_cursor_beyond_bigint_is_422(api_client: TestClient,
                                           user_headers: Headers) -> None:
    r = api_client.get("/v1/permit-events", params={"after": str(10**30)},
                       headers=user_headers("op"))
    assert r.status_code == 422, r.text


# Keycloak group membership after an amend races a revocation ----------------------------------

class _FakeGroups:
    """In-memory PermitGroups; runs ``on_sync`` once, right after the first sync (the moment
    amend has updated Keycloak and not yet opened its transaction)."""

    def __init__(self) -> None:
        self.groups: dict[str, set[str]] = {}
        self.on_sync: Callable[[], object] | None = None

    def missing_users(self, usernames: Sequence[str]) -> list[str]:
        return []

    def provision(self, permit_id: str, usernames: Sequence[str]) -> None:
        self.groups[permit_id] = set(usernames)

    def sync(self, permit_id: str, usernames: Sequence[str]) -> None:
        self.groups[permit_id] = set(usernames)
        hook, self.on_sync = self.on_sync, None
        if hook is not None:
            hook()

    def remove(self, permit_id: str) -> None:
        self.groups.pop(permit_id, None)


def test_amend_racing_revoke_does_not_recreate_the_group(db: Database) -> None:
    register_dataset(db)
    groups = _FakeGroups()
    svc = PermitService(db, groups=groups)
    pid = svc.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    etag = svc.get(ALPHA, pid).etag
    groups.on_sync = lambda: svc.transition(ALPHA, pid, Action.REVOKE, reason="misuse")
    with pytest.raises((Conflict, PreconditionFailed)):
        svc.amend(ALPHA, pid, PermitUpdate(persons=["alice", "carol"]), etag)
    assert pid not in groups.groups, "the revoked permit's Keycloak group was re-created"


# A person removed from a permit keeps a working workspace token -----------------------------

def test_workspace_token_of_removed_person_is_refused(db: Database, tmp_path: Any) -> None:
    register_dataset(db)
    settings = Settings(data_dir=tmp_path / "var", database_url=db.url)
    svc = PermitService(db)
    pid = svc.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    with db.write() as s:
        bob = mint_workspace_token(s, settings, subject="sub-bob", username="bob",
                                   permit_id=pid, workspace_id="ws-bob").token
        alice = mint_workspace_token(s, settings, subject="sub-alice", username="alice",
                                     permit_id=pid, workspace_id="ws-alice").token
    validator = SPETokenValidator(settings, db)
    assert validator.validate(bob).username == "bob"
    svc.amend(ALPHA, pid, PermitUpdate(persons=["alice"]), svc.get(ALPHA, pid).etag)
    with pytest.raises(NotAuthenticated):
        validator.validate(bob)
    principal: Principal = validator.validate(alice)
    assert principal.username == "alice"
    with db.read() as s:
        assert verify_chain(s).ok


# A retried issue racing its own first attempt ------------------------------------------------

def test_idempotent_retry_racing_the_first_attempt_is_a_replay(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry passed the replay check before the first attempt committed, then saw the
    permit's reference taken and answered 409 instead of replaying the first response."""
    from permits import catalog

    register_dataset(db)
    svc = PermitService(db)
    first: list[str] = []
    calls: list[int] = []
    real = catalog.check_grants

    def check_grants(session: Any, grants: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # the retry is here; the first attempt commits now
            first.append(svc.issue(ALPHA, PermitCreate.model_validate(body()),
                                   idempotency_key="k-1").permit_id)
        return real(session, grants)

    monkeypatch.setattr(catalog, "check_grants", check_grants)
    retry = svc.issue(ALPHA, PermitCreate.model_validate(body()), idempotency_key="k-1")
    assert retry.replayed and retry.permit_id == first[0]
