"""Reconcile the host with the workspace records after a crash (``kill -9`` of everything).

A workspace belongs to this SPE install when it has a record in this control database or a
directory under ``data_dir/workspaces``: its host objects are then named from its id
(namespace ``spe-<id>``, nftables table ``inet spe_ws_<id>``, veth ``speh<id[:11]>``, cgroup
``<parent>/<id>``, home mount and loop device under ``data_dir/workspaces/<id>``). Objects of
other installs are never touched.

:func:`reconcile` finds those objects, removes the ones of workspaces with no live process
(or all of them with ``include_live``, as ``spe up`` does before it starts the hub: a process
that survived its hub is an orphan) and marks every ``starting``/``running`` record of a
cleaned workspace ``stopped``. Each cleaned workspace is audited as
``workspace.reconcile`` in the same transaction as its record's change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from spe.audit import AuditEvent, Outcome, record
from spe.db import Database
from spe.db.base import utcnow
from workspaces import accounts, disk, helpers
from workspaces.lifecycle import find_cgroup
from workspaces.models import WorkspaceRow
from workspaces.network import NETNS_DIR, WorkspaceNetwork

LIVE_STATES = ("starting", "running")


@dataclass
class Cleaned:
    """What was found and removed for one workspace."""

    ws_id: str
    removed: list[str] = field(default_factory=list)
    record_was: str | None = None
    skipped_live: bool = False


def _nft_tables() -> set[str]:
    try:
        proc = helpers.run("nft", "list", "tables", "inet")
    except RuntimeError:  # nft not installed: no tables to find
        return set()
    if proc.returncode != 0:
        return set()
    return {line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("table")}


def _links() -> set[str]:
    try:
        proc = helpers.run("ip", "-o", "link", "show")
    except RuntimeError:
        return set()
    if proc.returncode != 0:
        return set()
    names = set()
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            names.add(parts[1].strip().split("@", 1)[0])
    return names


def _found(ws_id: str, root: Path, parent: str, tables: set[str],
           links: set[str]) -> list[str]:
    net = WorkspaceNetwork(ws_id, "", "", 0, ())
    found = []
    if (NETNS_DIR / net.netns).exists():
        found.append(f"netns {net.netns}")
    if net.table in tables:
        found.append(f"nft table inet {net.table}")
    if net.host_if in links:
        found.append(f"veth {net.host_if}")
    if find_cgroup(ws_id, parent) is not None:
        found.append(f"cgroup {parent}/{ws_id}")
    if disk.is_mounted(root / disk.MOUNT_NAME):
        found.append(f"mount {root / disk.MOUNT_NAME}")
    found.extend(f"loop {dev}" for dev in disk.loop_devices(root / disk.IMAGE_NAME))
    return found


def reconcile(db: Database, data_dir: Path, *, cgroup_parent: str,
              include_live: bool = False, actor: str = "spe-reconcile") -> list[Cleaned]:
    """Clean what workspaces of this install left on the host; returns what was done.

    Without ``include_live`` a workspace whose cgroup still holds processes is left alone
    (reported with ``skipped_live``). Idempotent: a second call finds nothing.
    """
    workspaces_dir = data_dir / "workspaces"
    with db.read() as session:
        rows = {r.id: r.state for r in session.scalars(select(WorkspaceRow))}
    ids = set(rows)
    if workspaces_dir.is_dir():
        ids |= {p.name for p in workspaces_dir.iterdir() if p.is_dir()}
    tables, links = _nft_tables(), _links()
    done: list[Cleaned] = []
    for ws_id in sorted(ids):
        root = workspaces_dir / ws_id
        found = _found(ws_id, root, cgroup_parent, tables, links)
        state = rows.get(ws_id)
        if not found and state not in LIVE_STATES:
            continue
        cg = find_cgroup(ws_id, cgroup_parent)
        if cg is not None and cg.pids() and not include_live:
            done.append(Cleaned(ws_id, skipped_live=True))
            continue
        if cg is not None:
            cg.destroy()
        with contextlib.suppress(RuntimeError):
            disk.detach(root)
        WorkspaceNetwork(ws_id, "", "", 0, ()).destroy()
        with contextlib.suppress(Exception):
            accounts.delete_account(accounts.account_name(ws_id))
        item = Cleaned(ws_id, removed=found, record_was=state)
        with db.write() as session:
            row = session.get(WorkspaceRow, ws_id)
            if row is not None and row.state in LIVE_STATES:
                now = utcnow()
                row.state, row.updated_at, row.stopped_at = "stopped", now, now
                row.last_error = "reconciled after an unclean stop"
            record(session, AuditEvent(
                action="workspace.reconcile", actor=actor, role="system",
                permit_id=row.permit_id if row is not None else None, target=ws_id,
                outcome=Outcome.SUCCESS,
                details={"removed": found, "record_was": state}))
        done.append(item)
    return done
