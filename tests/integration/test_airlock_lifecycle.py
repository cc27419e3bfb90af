"""Abandoned drafts are withdrawn after airlock_draft_days (audited, a reason the researcher
sees) and then fall under retention; every quarantined file of a permit that ended more than its
retention_days ago is deleted, released ones too (audited; rows and hashes stay). SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from permits.schemas import PermitCreate
from permits.service import PermitService
from permits.states import Action
from spe.airlock.models import ExportFile
from spe.airlock.service import AirlockService
from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.config import Settings
from spe.db import Database
from spe.db.base import utcnow
from tests.integration.test_airlock_retention import ADMINS, ALICE, TABLE, _request
from tests.integration.test_permit_service import ALPHA, body, register_dataset


@pytest.fixture
def setup(db: Database, tmp_path: Path) -> tuple[AirlockService, PermitService, str]:
    register_dataset(db)
    permits = PermitService(db)
    pid = permits.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    settings = Settings(data_dir=tmp_path / "data", database_url=db.url,
                        airlock_retention_days=30, airlock_draft_days=14)
    return AirlockService(db, settings), permits, pid


def _purges(db: Database) -> list[AuditEntry]:
    with db.read() as s:
        return list(s.execute(select(AuditEntry).where(
            AuditEntry.action == "airlock.purge").order_by(AuditEntry.seq)).scalars())


def test_abandoned_draft_is_withdrawn_then_purged(
        setup: tuple[AirlockService, PermitService, str], db: Database) -> None:
    svc, _permits, pid = setup
    draft, (d_file,) = _request(svc, pid, TABLE)
    submitted, _ = _request(svc, pid, TABLE)
    svc.submit(ALICE, pid, submitted)
    now = utcnow()
    assert svc.withdraw_stale_drafts(now + timedelta(days=13)) == 0
    later = now + timedelta(days=15)
    assert svc.purge_expired(later) == 0  # withdrawn now; its bytes wait for retention
    view = svc.get(ALICE, pid, draft)
    assert view["state"] == "withdrawn"
    assert "not changed for 14 days" in view["reason"]  # the researcher sees why
    assert svc.quarantine.exists(draft, d_file)
    assert svc.get(ALICE, pid, submitted)["state"] == "in_review"  # only drafts
    with db.read() as s:
        moves = list(s.execute(select(AuditEntry).where(
            AuditEntry.action == "airlock.transition", AuditEntry.target == draft)
            .order_by(AuditEntry.seq)).scalars())
    assert moves[-1].details["to"] == "withdrawn" and moves[-1].actor == "system"
    assert svc.purge_expired(later + timedelta(days=29)) == 0
    assert svc.purge_expired(later + timedelta(days=31)) >= 1
    assert not svc.quarantine.exists(draft, d_file)
    assert draft in {e.target for e in _purges(db)}


def test_ended_permit_loses_every_quarantined_file(
        setup: tuple[AirlockService, PermitService, str], db: Database) -> None:
    svc, permits, pid = setup
    released, (r_file,) = _request(svc, pid, TABLE)
    svc.submit(ALICE, pid, released)
    for admin in ADMINS:
        svc.vote(admin, pid, released, "approve", None, False, None, None)
    assert svc.get(ADMINS[0], pid, released)["state"] == "released"
    permits.transition(ALPHA, pid, Action.REVOKE, reason="end of study")
    retention = permits.get(ALPHA, pid).retention_days
    now = utcnow()
    # Within the permit's retention after revocation: the released file stays.
    assert svc.purge_ended_permits(now + timedelta(days=retention - 1)) == 0
    assert svc.quarantine.exists(released, r_file)
    assert svc.purge_ended_permits(now + timedelta(days=retention + 1)) == 1
    assert not svc.quarantine.exists(released, r_file)
    (entry,) = [e for e in _purges(db) if e.details.get("reason") == "permit_ended"]
    assert entry.details["permit_status"] == "revoked"
    assert entry.details["files"][0]["file_id"] == r_file
    with db.read() as s:
        row = s.get(ExportFile, r_file)
        assert row is not None and row.sha256  # the ledger's record stays
        assert verify_chain(s).ok
    assert svc.purge_ended_permits(now + timedelta(days=retention + 2)) == 0  # once only
