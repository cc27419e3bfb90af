"""Workspace records, retention and Ray activity: the parts of a workspace's life outside a spawn.

Contract:

* :func:`record_state` upserts the ``workspaces`` row of (person, permit) with the spawner's
  state (``starting``, ``running``, ``stopped``, ``refused``, ``failed``; ``deleted`` after
  :func:`purge_due`).
* :func:`schedule_deletion` (the permit expired or was revoked) sets ``delete_after`` = the
  event time + ``retention_days`` (the permit's own, exactly: :func:`permit_retention_days`;
  no setting rounds or caps it) on every workspace of the permit that has no earlier
  deadline, and audits ``workspace.data_delete_schedule``. Idempotent: a second call keeps the
  earliest deadline.
* :func:`purge_due` (called by the hub service with the current time; tests pass a clock)
  deletes the home and scratch data of every workspace whose deadline has passed, and the
  permit's pseudonymised extract, marks the row ``deleted`` and audits ``workspace.data_delete``
  with what was removed. A workspace whose permit is active again (e.g. extended) is not
  deleted: its deadline is cleared instead (audited).
* :func:`narrowing` says whether (and how) an amendment narrowed the permit: the hub service
  then stops every server of the permit, whoever it belongs to.
* :func:`ray_tasks_running` lists the Ray tasks executing in a workspace, read from the process
  titles of the workspace's cgroup (Ray workers are titled ``ray::IDLE`` when idle and
  ``ray::<task or actor>`` when busy). The host reads them as root without entering the sandbox.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from spe.audit import AuditEvent, Outcome, record
from spe.db import Database
from spe.db.base import utcnow
from workspaces import accounts, disk
from workspaces.cgroups import (
    ROOT,
    V1_CONTROLLERS,
    V1_OPTIONAL,
    WorkspaceCgroup,
    _own_v1_path,
    _v1_mount,
    is_v2,
)
from workspaces.extracts import remove_extract
from workspaces.models import WorkspaceRow


def server_name(permit_id: str) -> str:
    """The hub server name of a permit's workspace (JupyterHub 6 wants a 1-30 character slug
    starting with a letter; permit ids are UUIDs): ``p`` + 29 hex digits of the id."""
    return "p" + permit_id.replace("-", "").lower()[:29]


def record_state(db: Database, *, person: str, permit_id: str, state: str,
                 error: str | None = None) -> None:
    ws_id = accounts.workspace_id(person, permit_id)
    now = utcnow()
    with db.write() as session:
        row = session.get(WorkspaceRow, ws_id)
        if row is None:
            row = WorkspaceRow(id=ws_id, person=person, permit_id=permit_id,
                               unix_user=accounts.account_name(ws_id), state=state,
                               created_at=now)
            session.add(row)
        row.state, row.updated_at, row.last_error = state, now, error
        if state == "running":
            row.started_at = now
        elif state in ("stopped", "failed"):
            row.stopped_at = now


def permit_retention_days(db: Database, permit_id: str) -> int:
    """The retention period the permit states (its newest version)."""
    from permits.service import get_terms

    with db.read() as session:
        return get_terms(session, permit_id).retention_days


def narrowing(db: Database, permit_id: str, version: int) -> list[str]:
    """How amendment ``version`` of the permit narrowed what its workspaces may see, compared
    with the version before (empty: it did not): a dataset, table or column no longer granted,
    or the access mode moved from ``pseudonymised`` to ``dp_only``."""
    from permits.queries import version_snapshot

    with db.read() as session:
        after = version_snapshot(session, permit_id, version)
        before = version_snapshot(session, permit_id, version - 1) if version > 1 else None
        if after is None or before is None:
            return []
    reasons = []
    if before.get("access_mode") == "pseudonymised" and after.get("access_mode") != before.get(
            "access_mode"):
        reasons.append("access mode pseudonymised -> " + str(after.get("access_mode")))
    granted = {g["dataset"]: g["tables"] for g in after.get("datasets", [])}
    for grant in before.get("datasets", []):
        tables = granted.get(grant["dataset"])
        if tables is None:
            reasons.append(f"dataset {grant['dataset']} removed")
            continue
        for table, columns in grant["tables"].items():
            if table not in tables:
                reasons.append(f"table {grant['dataset']}.{table} removed")
            elif set(columns) - set(tables[table]):
                reasons.append(f"columns of {grant['dataset']}.{table} removed")
    return reasons


def schedule_deletion(db: Database, permit_id: str, *, ended_at: datetime,
                      retention_days: int, reason: str, actor: str = "system") -> list[str]:
    """Set the deletion deadline of the permit's workspaces; returns their ids."""
    deadline = ended_at + timedelta(days=retention_days)
    with db.write() as session:
        rows = session.execute(select(WorkspaceRow).where(
            WorkspaceRow.permit_id == permit_id, WorkspaceRow.state != "deleted")).scalars().all()
        changed = []
        for row in rows:
            if row.delete_after is None or row.delete_after > deadline:
                row.delete_after = deadline
                changed.append(row.id)
        if not changed:
            return changed
        record(session, AuditEvent(
            action="workspace.data_delete_schedule", actor=actor, permit_id=permit_id,
            target=permit_id, reason=reason,
            details={"delete_after": deadline.isoformat(), "workspaces": changed,
                     "retention_days": retention_days}))
        return changed


def _size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def purge_due(db: Database, data_dir: Path, *, now: datetime | None = None,
              actor: str = "system") -> list[str]:
    """Delete the data of workspaces past their deadline; returns the ids deleted."""
    from permits.service import permit_is_active

    now = now or utcnow()
    with db.read() as session:
        due = [(r.id, r.permit_id, r.person) for r in session.execute(
            select(WorkspaceRow).where(WorkspaceRow.delete_after.is_not(None),
                                       WorkspaceRow.delete_after <= now,
                                       WorkspaceRow.state != "deleted")).scalars()]
    deleted = []
    for ws_id, permit_id, person in due:
        with db.write() as session:
            row = session.get(WorkspaceRow, ws_id)
            if row is None or row.state == "deleted":
                continue
            if permit_is_active(session, permit_id):  # extended or resumed since
                row.delete_after = None
                record(session, AuditEvent(
                    action="workspace.data_delete", actor=actor, permit_id=permit_id,
                    target=ws_id, outcome=Outcome.REFUSED, reason="permit is active again",
                    details={"person": person}))
                continue
            root = data_dir / "workspaces" / ws_id
            disk.detach(root)  # a home image left mounted must not be emptied through it
            removed = {"workspace_dir": str(root.name), "bytes": _size(root) if root.exists()
                       else 0, "extract": False}
            shutil.rmtree(root, ignore_errors=True)
            extract = data_dir / "extracts" / permit_id.replace("-", "_")
            if extract.exists():
                remove_extract(data_dir / "extracts", permit_id)
                removed["extract"] = True
            row.state, row.updated_at = "deleted", now
            record(session, AuditEvent(
                action="workspace.data_delete", actor=actor, permit_id=permit_id, target=ws_id,
                reason="retention period ended",
                details={**removed, "person": person,
                         "deadline": row.delete_after.isoformat() if row.delete_after else None,
                         "deleted_at": now.isoformat()}))
            deleted.append(ws_id)
    return deleted


def find_cgroup(ws_id: str, parent: str, root: Path = ROOT) -> WorkspaceCgroup | None:
    """The existing cgroup of workspace ``ws_id`` (None when it has none)."""
    if is_v2(root):
        d = root / parent / ws_id
        return WorkspaceCgroup(ws_id, 2, (d,)) if d.is_dir() else None
    dirs = []
    for controller in (*V1_CONTROLLERS, *V1_OPTIONAL):
        try:
            d = _v1_mount(controller, root) / _own_v1_path(controller) / parent / ws_id
        except RuntimeError:
            continue
        if d.is_dir():
            dirs.append(d)
    return WorkspaceCgroup(ws_id, 1, tuple(dirs)) if dirs else None


def ray_tasks_running(cgroup: WorkspaceCgroup | None) -> list[str]:
    """Titles of busy Ray workers in the workspace (empty: no Ray work running)."""
    if cgroup is None:
        return []
    busy = []
    for pid in sorted(cgroup.pids()):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        title = raw.split(b"\0", 1)[0].decode(errors="replace").strip()
        if title.startswith("ray::") and not title.startswith("ray::IDLE"):
            busy.append(title[:80])
    return busy


def cleanup_leftovers(ws_id: str, parent: str, root: Path | None = None) -> None:
    """Remove what a dead workspace left (hub restarted): processes, cgroup, home mount (with
    its loop device, when ``root``, the workspace directory, is given), namespace, account.

    The home is kept (retention). Idempotent; only SPE-named objects are touched.
    """
    from workspaces.network import WorkspaceNetwork

    cg = find_cgroup(ws_id, parent)
    if cg is not None:
        cg.destroy()
    if root is not None:
        disk.detach(root)
    WorkspaceNetwork(ws_id, "", "", 0, ()).destroy()
    accounts.delete_account(accounts.account_name(ws_id))


def permits_naming(db: Database, person: str) -> list[tuple[str, str]]:
    """(permit id, reference) of the active permits naming ``person``, newest first."""
    from permits.queries import permits_naming as naming
    from permits.service import permit_is_active

    with db.read() as session:
        return [(pid, ref) for pid, ref in naming(session, person)
                if permit_is_active(session, pid)]


def permit_for_server(db: Database, person: str, name: str) -> str | None:
    """The permit id of ``person``'s server ``name`` (from the workspace records)."""
    with db.read() as session:
        for pid in session.execute(select(WorkspaceRow.permit_id).where(
                WorkspaceRow.person == person)).scalars():
            if server_name(pid) == name:
                return str(pid)
    return None
