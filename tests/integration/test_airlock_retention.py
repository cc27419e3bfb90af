"""Quarantine retention on SQLite and PostgreSQL: the bytes of files that were not released
go after airlock_retention_days (audited, rows and hashes kept); released files stay for the
ledger and still serve differencing."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from permits.schemas import PermitCreate
from permits.service import PermitService
from spe.airlock.models import ExportFile
from spe.airlock.service import AirlockService
from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.auth.principal import Principal, Role
from spe.config import Settings
from spe.db import Database
from spe.db.base import utcnow
from tests.integration.test_permit_service import ALPHA, body, register_dataset

ALICE = Principal(subject="al", username="alice", kind="user",
                  roles=frozenset({Role.RESEARCHER}))
ADMINS = [Principal(subject=f"h{i}", username=f"hadmin{i}", kind="user",
                    roles=frozenset({Role.HOSPITAL_ADMIN})) for i in (1, 2)]
TABLE = b"region,n\nnorth,120\nsouth,130\n"


@pytest.fixture
def airlock(db: Database, tmp_path: Path) -> tuple[AirlockService, str]:
    register_dataset(db)
    pid = PermitService(db).issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    settings = Settings(data_dir=tmp_path / "data", database_url=db.url,
                        airlock_retention_days=30)
    return AirlockService(db, settings), pid


def _request(svc: AirlockService, pid: str, *files: bytes) -> tuple[str, list[str]]:
    req = svc.create(ALICE, pid, "aggregates for the paper", [])
    ids = [svc.upload(ALICE, pid, req["id"], f"t{i}.csv", data)["id"]
           for i, data in enumerate(files)]
    return req["id"], ids


def test_unreleased_bytes_go_after_retention(airlock: tuple[AirlockService, str],
                                             db: Database) -> None:
    svc, pid = airlock
    # Withdrawn after submission.
    withdrawn, (w_file,) = _request(svc, pid, TABLE)
    svc.submit(ALICE, pid, withdrawn)
    svc.withdraw(ALICE, pid, withdrawn)
    # Released in part: the reviewers approve one file and reject the other.
    partial, (kept, refused) = _request(svc, pid, TABLE,
                                        b"region,n\nnorth,220\nsouth,230\neast,240\n")
    svc.submit(ALICE, pid, partial)
    for admin in ADMINS:
        svc.vote(admin, pid, partial, "approve", None, False, None, {refused: "reject"})
    assert svc.get(ADMINS[0], pid, partial)["state"] == "released"
    # Still a draft: never purged, whatever its age.
    draft, (d_file,) = _request(svc, pid, TABLE)

    q = svc.quarantine
    assert svc.purge_expired() == 0  # nothing is 30 days old yet
    assert all(q.exists(r, f) for r, f in ((withdrawn, w_file), (partial, kept),
                                           (partial, refused), (draft, d_file)))
    later = utcnow() + timedelta(days=31)
    assert svc.purge_expired(later) == 2
    assert not q.exists(withdrawn, w_file) and not q.exists(partial, refused)
    assert q.exists(partial, kept) and q.exists(draft, d_file)
    assert svc.purge_expired(later) == 0  # once only

    with db.read() as s:
        rows = {f.id: f for f in s.execute(select(ExportFile)).scalars()}
        purges = list(s.execute(select(AuditEntry).where(
            AuditEntry.action == "airlock.purge")).scalars())
    assert rows[w_file].sha256 and rows[refused].size > 0  # the records stay
    assert sorted(f["file_id"] for e in purges for f in e.details["files"]) == \
        sorted([w_file, refused])
    assert {e.target for e in purges} == {withdrawn, partial}
    with db.read() as s:
        assert verify_chain(s).ok

    # The released table still serves differencing: one person less is flagged.
    again, _ = _request(svc, pid, b"region,n\nnorth,119\nsouth,130\n")
    checks = {c["name"]: c for c in svc.submit(ALICE, pid, again)["files"][0]["checks"]}
    assert checks["differencing"]["outcome"] == "fail"
