"""Stored permits are read through their schema: a version stored before a field existed
reads back with that field's default (tests/fixtures/permit_snapshot_old.json has no
application reference, access mode, tools, retention, conditions, compute quota or export
limits: fields added after it was written)."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import text, update

from permits.models import PermitVersion
from permits.schemas import PermitContent, PermitCreate
from permits.service import PermitService, get_terms
from permits.snapshots import is_current, read_snapshot
from spe.db import Database
from tests.integration.test_permit_service import ALPHA, body, register_dataset

OLD = json.loads((Path(__file__).parents[1] / "fixtures" / "permit_snapshot_old.json")
                 .read_text())


def test_old_snapshot_reads_with_defaults() -> None:
    assert not is_current(OLD)
    read = read_snapshot(OLD)
    assert is_current(read)
    defaults = PermitContent.model_validate(OLD)
    assert read["retention_days"] == defaults.retention_days
    assert read["compute_quota"] == defaults.compute_quota.model_dump(mode="json")
    for name, field in type(defaults.export_policy).model_fields.items():
        assert name in read["export_policy"]
        if name not in OLD["export_policy"]:
            assert read["export_policy"][name] == field.default
    current = read_snapshot(read)
    assert current is read  # a current snapshot is not re-validated


def _store_as_an_older_spe_did(db: Database, permit_id: str, snapshot: dict[str, object]
                               ) -> None:
    """Replace the stored version 1 with ``snapshot``: the history is append-only, so the
    guard is lifted for this one write (as if the row had been written by an older SPE)."""
    with db.write() as s:
        if s.bind.dialect.name == "sqlite":
            s.execute(text("DROP TRIGGER permit_versions_no_update"))
        else:
            s.execute(text("ALTER TABLE permit_versions DISABLE TRIGGER "
                           "permit_versions_append_only"))
        s.execute(update(PermitVersion).where(PermitVersion.permit_id == permit_id)
                  .values(snapshot=snapshot))
        if s.bind.dialect.name == "sqlite":
            s.execute(text("CREATE TRIGGER permit_versions_no_update BEFORE UPDATE ON "
                           "permit_versions BEGIN SELECT RAISE(ABORT, 'permit_versions is "
                           "append-only'); END"))
        else:
            s.execute(text("ALTER TABLE permit_versions ENABLE TRIGGER "
                           "permit_versions_append_only"))


def test_stored_old_version_reads_through_the_service(db: Database) -> None:
    register_dataset(db)
    svc = PermitService(db)
    pid = svc.issue(ALPHA, PermitCreate.model_validate(body())).permit_id
    _store_as_an_older_spe_did(db, pid, OLD)
    permit = svc.get(ALPHA, pid)
    assert permit.retention_days == PermitContent.model_validate(OLD).retention_days
    assert permit.compute_quota == PermitContent.model_validate(OLD).compute_quota
    view = svc.view(ALPHA, pid).document
    assert view["compute_quota"] == permit.compute_quota.model_dump(mode="json")
    assert set(view["export_policy"]) == set(permit.export_policy.model_dump())
    with db.read() as s:
        terms = get_terms(s, pid)
    assert terms.retention_days == permit.retention_days
    assert terms.compute.gpus == permit.compute_quota.gpus
