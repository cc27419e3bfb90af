"""Reconcile after a crash: stale namespace, veth, nftables table and record of this install
are removed, the record marked stopped and the cleanup audited; others' objects stay."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.db import Database
from spe.db.base import utcnow
from workspaces import network
from workspaces.models import WorkspaceRow
from workspaces.reconcile import reconcile

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nft")),
    reason="needs root, ip and nft to make real namespaces and nftables tables",
)


def _tables() -> str:
    return subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True,
                          check=True).stdout


def test_reconcile_cleans_stale_objects_of_this_install_only(
    sqlite_db: Database, tmp_path: Path
) -> None:
    ours = "r" + uuid.uuid4().hex[:15]
    foreign = "f" + uuid.uuid4().hex[:15]
    (tmp_path / "workspaces" / ours).mkdir(parents=True)
    with sqlite_db.write() as session:
        session.add(WorkspaceRow(id=ours, person="alice", permit_id=str(uuid.uuid4()),
                                 unix_user="spe-x", state="running", created_at=utcnow()))
    net = network.create(ours, (65000,))
    other = network.create(foreign, (65000,))
    try:
        assert net.exists() and net.table in _tables()
        done = reconcile(sqlite_db, tmp_path, cgroup_parent="spe-test-reconcile")
        assert [c.ws_id for c in done] == [ours]
        assert f"netns {net.netns}" in done[0].removed
        assert f"nft table inet {net.table}" in done[0].removed
        assert not net.exists()
        assert net.table not in _tables()
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert net.host_if not in links
        assert other.exists() and other.table in _tables()  # not ours: untouched
        with sqlite_db.read() as session:
            row = session.get(WorkspaceRow, ours)
            assert row is not None and row.state == "stopped"
            entries = session.scalars(
                select(AuditEntry).where(AuditEntry.action == "workspace.reconcile")).all()
            assert [e.target for e in entries] == [ours]
            assert verify_chain(session).ok
        assert reconcile(sqlite_db, tmp_path, cgroup_parent="spe-test-reconcile") == []
    finally:
        net.destroy()
        other.destroy()
