"""The permit read path (``PermitService.view`` over ``Database.read_one`` and the version
snapshot cache) on SQLite and PostgreSQL: it returns exactly what the schema read (ORM,
``to_public``) returns; a status change or a removed person is seen by the very next read,
in the service that made it and in another one (another worker process's); it sees committed
data only; on PostgreSQL a dead pooled connection is replaced and the read retried."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, text

from permits.models import Permit
from permits.schemas import PermitCreate, PermitUpdate
from permits.service import _HEAD_QUERY, PermitService, _load, to_public
from permits.states import Action
from spe.db import Database
from spe.errors import NotFound
from tests.integration.test_permit_service import ALICE, ALPHA, BETA, NOW, body, register_dataset


@pytest.fixture
def svc(db: Database) -> PermitService:
    register_dataset(db)
    return PermitService(db, clock=lambda: NOW + timedelta(hours=1))


def _schema_read(svc: PermitService, permit_id: str) -> dict[str, object]:
    with svc.db.read() as s:
        loaded = _load(s, permit_id)
        assert loaded is not None
        permit, version = loaded
        return to_public(permit, version.snapshot, svc.clock()).model_dump(mode="json")


def test_view_is_the_schema_read(svc: PermitService) -> None:
    pid = svc.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    assert svc.view(ALPHA, pid).document == _schema_read(svc, pid)
    etag = svc.view(ALPHA, pid).etag
    svc.amend(ALPHA, pid, PermitUpdate.model_validate({"title": "Renamed"}), etag)
    view = svc.view(ALPHA, pid)
    assert view.document == _schema_read(svc, pid)
    assert view.document["title"] == "Renamed" and view.document["version"] == 2
    assert view.public().model_dump(mode="json") == view.document


@pytest.mark.parametrize("separate", [False, True], ids=["same-service", "another-worker"])
def test_a_change_is_seen_by_the_next_read(db: Database, separate: bool) -> None:
    """A suspension, a removed person and a revocation are seen by the next read, in the
    service that made them and in another one (another worker process's cache)."""
    register_dataset(db)
    writer = PermitService(db, clock=lambda: NOW + timedelta(hours=1))
    reader = PermitService(db, clock=lambda: NOW + timedelta(hours=1)) if separate else writer
    pid = writer.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    assert reader.view(ALICE, pid).document["status"] == "active"
    writer.transition(ALPHA, pid, Action.SUSPEND, reason="review")
    assert reader.view(ALICE, pid).document["status"] == "suspended"
    writer.transition(ALPHA, pid, Action.RESUME, reason="done")
    etag = writer.view(ALPHA, pid).etag
    writer.amend(ALPHA, pid, PermitUpdate.model_validate({"persons": ["bob"]}), etag)
    with pytest.raises(NotFound):  # alice was removed: refused at once
        reader.view(ALICE, pid)
    with pytest.raises(NotFound):  # another access body never sees it
        reader.view(BETA, pid)
    assert reader.view(ALPHA, pid).document == _schema_read(writer, pid)
    writer.transition(ALPHA, pid, Action.REVOKE, reason="end")
    assert reader.view(ALPHA, pid).document["status"] == "revoked"


def test_document_is_a_copy(svc: PermitService) -> None:
    pid = svc.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    doc = svc.view(ALPHA, pid).document
    doc["persons"].append("mallory")
    doc["datasets"][0]["tables"]["person"].append("secret")
    again = svc.view(ALPHA, pid)
    assert "mallory" not in again.persons and "mallory" not in again.document["persons"]
    assert again.document == _schema_read(svc, pid)


def test_read_one_sees_committed_data_only(svc: PermitService) -> None:
    pid = svc.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    with svc.db.write() as s:
        s.execute(text("UPDATE permits SET status = 'suspended' WHERE id = :id"), {"id": pid})
        row = svc.db.read_one(_HEAD_QUERY, {"permit_id": pid})
        assert row is not None and row[2] == "active"  # the writer has not committed
    row = svc.db.read_one(_HEAD_QUERY, {"permit_id": pid})
    assert row is not None and row[2] == "suspended"
    assert svc.db.read_one(_HEAD_QUERY, {"permit_id": "no-such-permit"}) is None
    with svc.db.read() as s:
        assert s.execute(select(Permit.status).where(Permit.id == pid)).scalar() == "suspended"


def test_read_one_replaces_a_dead_connection(svc: PermitService) -> None:
    if svc.db.is_sqlite:
        pytest.skip("PostgreSQL only: SQLite has no server connection to lose")
    pid = svc.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    assert svc.db.read_one(_HEAD_QUERY, {"permit_id": pid}) is not None
    with svc.db.write() as s:  # what a database restart does to every pooled connection
        killed = s.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    assert killed and killed >= 1
    row = svc.db.read_one(_HEAD_QUERY, {"permit_id": pid})
    assert row is not None and row[0] == pid
    assert svc.view(ALPHA, pid).document["id"] == pid
