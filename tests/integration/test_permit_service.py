"""The permit service layer on SQLite and PostgreSQL, driven with Principal objects."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from permits import events
from permits.errors import PreconditionRequired
from permits.expiry import ExpirySweeper
from permits.models import PermitEvent, PermitVersion
from permits.schemas import PermitCreate, PermitUpdate
from permits.service import PermitService, get_terms, permit_is_active
from permits.states import Action
from permits.terms import PermitStatus
from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.auth.principal import Principal, Role
from spe.datasets.metadata import ColumnMeta, DatasetMetadata, TableMeta
from spe.datasets.models import DatasetRecord
from spe.db import Database
from spe.errors import Conflict, Forbidden, InvalidInput, NotFound, PreconditionFailed

NOW = datetime.now(UTC).replace(microsecond=0)
ALPHA = Principal(subject="a", username="hdab-alpha", kind="service",
                  roles=frozenset({Role.ACCESS_BODY}), access_body="hdab-alpha")
BETA = Principal(subject="b", username="hdab-beta", kind="service",
                 roles=frozenset({Role.ACCESS_BODY}), access_body="hdab-beta")
ADMIN = Principal(subject="h", username="hadmin", kind="user",
                  roles=frozenset({Role.HOSPITAL_ADMIN}))
ALICE = Principal(subject="al", username="alice", kind="user",
                  roles=frozenset({Role.RESEARCHER}))
CAROL = Principal(subject="ca", username="carol", kind="user",
                  roles=frozenset({Role.RESEARCHER}))
OP = Principal(subject="o", username="op", kind="user", roles=frozenset({Role.OPERATOR}))


def register_dataset(db: Database, name: str = "demo") -> None:
    cols = [ColumnMeta(name=n, type=t) for n, t in
            [("person_id", "BIGINT"), ("year_of_birth", "BIGINT"),
             ("gender_concept_id", "BIGINT"), ("_spe_row_rank", "BIGINT")]]
    meta = DatasetMetadata(name=name, tables={"person": TableMeta(name="person", columns=cols,
                                                                  row_count=3)},
                           source_format="csv", content_sha256="0" * 64)
    with db.write() as s:
        s.add(DatasetRecord(name=name, store_file=f"{name}.duckdb", created_by="test",
                            total_rows=3, meta=meta.model_dump(mode="json"),
                            created_at=NOW))


def body(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "reference": "0001/2026/FI",
        "title": "Test project",
        "holder": {"organisation": "Uni", "principal_investigator": "Dr PI"},
        "purposes": ["scientific_research"],
        "purpose_justification": "because",
        "datasets": [{"dataset": "demo", "tables": {"person": ["person_id", "year_of_birth"]}}],
        "persons": ["alice", "bob"],
        "valid_from": (NOW - timedelta(days=1)).isoformat(),
        "valid_until": (NOW + timedelta(days=365)).isoformat(),
        "privacy_budget": {"epsilon": 5, "delta": 1e-6, "max_epsilon_per_query": 1},
    }
    data.update(over)
    return data


@pytest.fixture
def svc(db: Database) -> PermitService:
    register_dataset(db)
    return PermitService(db)


def issue(svc: PermitService, who: Principal = ALPHA, **over: Any) -> str:
    return svc.issue(who, PermitCreate.model_validate(body(**over))).permit_id


def test_lifecycle_versions_events_audit(svc: PermitService, db: Database) -> None:
    seen: list[events.PermitEventRecord] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        pid = issue(svc)
        p = svc.get(ALPHA, pid)
        assert p.status is PermitStatus.ACTIVE and p.version == 1
        amended = svc.amend(ALPHA, pid, PermitUpdate(persons=["alice", "carol"]), p.etag)
        assert amended.version == 2 and amended.persons == ["alice", "carol"]
        svc.transition(ALPHA, pid, Action.SUSPEND, reason="check")
        assert svc.get(ADMIN, pid).status is PermitStatus.SUSPENDED
        assert not permit_is_active_(db, pid)
        svc.transition(ALPHA, pid, Action.RESUME, reason="ok")
        assert permit_is_active_(db, pid)
        ext = svc.transition(ALPHA, pid, Action.EXTEND, reason="more",
                             new_valid_until=NOW + timedelta(days=800))
        assert ext.extended and ext.valid_until == NOW + timedelta(days=800)
        with pytest.raises(Conflict, match="already been extended"):
            svc.transition(ALPHA, pid, Action.EXTEND, reason="again",
                           new_valid_until=NOW + timedelta(days=900))
        svc.transition(ALPHA, pid, Action.REVOKE, reason="misuse")
        with pytest.raises(Conflict, match="revocation is final"):
            svc.transition(ALPHA, pid, Action.RESUME, reason="undo")
        cur = svc.get(ALPHA, pid)
        with pytest.raises(Conflict, match="revoked"):
            svc.amend(ALPHA, pid, PermitUpdate(title="x"), cur.etag)
    finally:
        unsubscribe()
    kinds = [e.kind.value for e in seen if e.permit_id == pid]
    assert kinds == ["issued", "amended", "suspended", "resumed", "extended", "revoked"]
    versions = svc.versions(ADMIN, pid)
    assert [v.version for v in versions] == [1, 2, 3, 4, 5, 6]
    assert versions[1].changed_fields == ["persons"]
    assert versions[0].content.persons == ["alice", "bob"]
    with db.read() as s:
        assert verify_chain(s).ok
        actions = [a for (a,) in s.execute(select(AuditEntry.action).where(
            AuditEntry.permit_id == pid).order_by(AuditEntry.seq))]
        polled = events.poll(s, 0)
    assert actions[:3] == ["permit.issue", "permit.amend", "permit.suspend"]
    assert "auth.permit_tokens_revoke" in actions
    assert [e.id for e in polled] == list(range(1, len(polled) + 1))


def permit_is_active_(db: Database, pid: str) -> bool:
    with db.read() as s:
        return permit_is_active(s, pid)


def test_access_bodies_are_isolated(svc: PermitService) -> None:
    pid = issue(svc)
    with pytest.raises(NotFound):
        svc.get(BETA, pid)
    with pytest.raises(NotFound):
        svc.transition(BETA, pid, Action.REVOKE, reason="x")
    with pytest.raises(NotFound):
        svc.amend(BETA, pid, PermitUpdate(title="x"), '"whatever"')
    assert svc.list_permits(BETA).items == []
    assert [p.id for p in svc.list_permits(ALPHA).items] == [pid]
    # readers
    assert svc.get(ADMIN, pid).id == pid
    assert svc.get(ALICE, pid).id == pid
    with pytest.raises(NotFound):
        svc.get(CAROL, pid)
    with pytest.raises(Forbidden):
        svc.get(OP, pid)
    for who in (ADMIN, ALICE, OP):
        with pytest.raises(Forbidden):
            svc.transition(who, pid, Action.SUSPEND, reason="x")
        with pytest.raises(Forbidden):
            svc.issue(who, PermitCreate.model_validate(body(reference="x")))


def test_etag_rules(svc: PermitService) -> None:
    pid = issue(svc)
    etag = svc.get(ALPHA, pid).etag
    with pytest.raises(PreconditionRequired):
        svc.amend(ALPHA, pid, PermitUpdate(title="a"), None)
    svc.amend(ALPHA, pid, PermitUpdate(title="a"), etag)
    with pytest.raises(PreconditionFailed):
        svc.amend(ALPHA, pid, PermitUpdate(title="b"), etag)


def test_concurrent_amend_has_one_winner(svc: PermitService) -> None:
    pid = issue(svc)
    etag = svc.get(ALPHA, pid).etag
    results: list[str] = []
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            svc.amend(ALPHA, pid, PermitUpdate(title=f"title {i}"), etag)
            results.append("ok")
        except PreconditionFailed:
            results.append("412")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["412", "412", "412", "ok"]
    assert svc.get(ALPHA, pid).version == 2


def test_validation_names_fields(svc: PermitService) -> None:
    bad = body(datasets=[{"dataset": "demo", "tables": {"person": ["nope", "_spe_row_rank"],
                                                        "visit": ["x"]}},
                         {"dataset": "ghost", "tables": {"t": ["c"]}}])
    with pytest.raises(InvalidInput) as err:
        svc.issue(ALPHA, PermitCreate.model_validate(bad))
    msgs = " ".join(e["msg"] for e in err.value.errors)
    assert "'nope'" in msgs and "'_spe_row_rank'" in msgs and "'visit'" in msgs
    assert "'ghost'" in msgs
    with pytest.raises(InvalidInput, match="invalid fields"):
        svc.issue(ALPHA, PermitCreate.model_validate(
            body(valid_from=(NOW - timedelta(days=4000)).isoformat())))
    with pytest.raises(InvalidInput):
        svc.issue(ALPHA, PermitCreate.model_validate(
            body(valid_from=(NOW - timedelta(days=10)).isoformat(),
                 valid_until=(NOW - timedelta(days=1)).isoformat())))
    pid = issue(svc)
    with pytest.raises(Conflict, match="reference"):
        issue(svc)
    etag = svc.get(ALPHA, pid).etag
    with pytest.raises(InvalidInput) as err:
        svc.amend(ALPHA, pid, PermitUpdate.model_validate(
            {"access_mode": "pseudonymised", "decision": "partially_granted"}), etag)
    locs = {tuple(e["loc"]) for e in err.value.errors}
    assert ("body", "pseudonymisation_justification") in locs
    assert ("body", "not_granted") in locs


def test_idempotent_issue(svc: PermitService) -> None:
    first = svc.issue(ALPHA, PermitCreate.model_validate(body()), idempotency_key="k1")
    again = svc.issue(ALPHA, PermitCreate.model_validate(body()), idempotency_key="k1")
    assert again.replayed and again.permit_id == first.permit_id and again.body == first.body
    with pytest.raises(InvalidInput, match="Idempotency-Key"):
        svc.issue(ALPHA, PermitCreate.model_validate(body(title="other")), idempotency_key="k1")
    # keys are per access body
    other = svc.issue(BETA, PermitCreate.model_validate(body()), idempotency_key="k1")
    assert not other.replayed and other.permit_id != first.permit_id


def test_expiry_sweeper_and_terms(svc: PermitService, db: Database) -> None:
    pid = issue(svc)
    with db.read() as s:
        terms = get_terms(s, pid)
    assert terms.usable and terms.allowed_columns("demo", "person") == {"person_id",
                                                                         "year_of_birth"}
    later = NOW + timedelta(days=366)
    svc.clock = lambda: later
    assert svc.get(ALPHA, pid).status is PermitStatus.EXPIRED  # effective before the sweep
    with db.read() as s:
        assert get_terms(s, pid, later).status is PermitStatus.EXPIRED
    sweeper = ExpirySweeper(svc)
    assert sweeper.run_once() == [pid]
    assert sweeper.run_once() == []
    with db.read() as s:
        kinds = [k for (k,) in s.execute(select(PermitEvent.kind).where(
            PermitEvent.permit_id == pid).order_by(PermitEvent.id))]
        last = s.execute(select(PermitVersion).where(PermitVersion.permit_id == pid)
                         .order_by(PermitVersion.version.desc())).scalars().first()
        audit = s.execute(select(AuditEntry).where(AuditEntry.action == "permit.expire")
                          ).scalars().one()
    assert kinds == ["issued", "expired"]
    assert last is not None and last.status == "expired" and last.actor == "system"
    assert audit.permit_id == pid
    with pytest.raises(Conflict, match="expired"):
        svc.amend(ALPHA, pid, PermitUpdate(title="x"), svc.get(ALPHA, pid).etag)
    with pytest.raises(NotFound), db.read() as s:
        get_terms(s, "nope")


def test_list_filters_and_cursor(svc: PermitService) -> None:
    ids = [issue(svc, reference=f"R{i}", persons=["alice"] if i % 2 else ["bob"])
           for i in range(5)]
    svc.transition(ALPHA, ids[0], Action.SUSPEND, reason="x")
    page1 = svc.list_permits(ALPHA, limit=2)
    page2 = svc.list_permits(ALPHA, limit=2, cursor=page1.next_cursor)
    page3 = svc.list_permits(ALPHA, limit=2, cursor=page2.next_cursor)
    assert [p.id for p in page1.items + page2.items + page3.items] == ids
    assert page3.next_cursor is None
    assert [p.id for p in svc.list_permits(ALPHA, status=PermitStatus.SUSPENDED).items] == \
        [ids[0]]
    assert len(svc.list_permits(ALPHA, status=PermitStatus.ACTIVE).items) == 4
    assert [p.id for p in svc.list_permits(ALPHA, person="alice").items] == [ids[1], ids[3]]
    assert len(svc.list_permits(ALPHA, dataset="demo").items) == 5
    assert svc.list_permits(ALPHA, dataset="other").items == []
    assert [p.id for p in svc.list_permits(ALICE).items] == [ids[1], ids[3]]
    assert len(svc.list_permits(ADMIN).items) == 5
    with pytest.raises(InvalidInput):
        svc.list_permits(ALPHA, cursor="!!garbage")


def test_event_page_roles(svc: PermitService) -> None:
    issue(svc)
    page = svc.event_page(OP, after=0)
    assert [e.kind for e in page.items] == ["issued"] and page.last_id == 1
    assert svc.event_page(ADMIN, after=1).items == []
    for who in (ALPHA, ALICE):
        with pytest.raises(Forbidden):
            svc.event_page(who)


def test_concurrent_idempotent_issue_makes_one_permit(svc: PermitService) -> None:
    results: list[str] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(svc.issue(ALPHA, PermitCreate.model_validate(body()),
                                 idempotency_key="same").permit_id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(svc.list_permits(ALPHA).items) == 1


def test_history_tables_are_append_only(svc: PermitService, db: Database) -> None:
    pid = issue(svc)
    for statement in ("UPDATE permit_versions SET actor = 'x'",
                      "DELETE FROM permit_versions", "DELETE FROM permit_events"):
        with pytest.raises(DBAPIError), db.write() as s:
            s.execute(text(statement))
    assert [v.version for v in svc.versions(ALPHA, pid)] == [1]
