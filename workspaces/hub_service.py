"""The hub-side workspace service: permit events, idle culling, retention.

Runs as a JupyterHub managed service (``python -m workspaces.hub_service``; the hub passes its
API URL and token) with the SPE settings of the hub. One loop does three things:

* **Permit events** (every ``events_poll_seconds``): reads the ``permit_events`` outbox after
  its stored cursor (``<data_dir>/hub/permit_events.cursor``, so nothing is missed across
  restarts). ``suspended``, ``revoked`` and ``expired`` stop every server named by the permit
  through the hub API (the spawner then kills the workspace cgroup, Ray included, releases GPUs
  and revokes the workspace tokens; the permit service already revoked the permit's tokens in
  its own transaction). ``revoked`` and ``expired`` also schedule the deletion of the
  workspaces' data after the permit's own ``retention_days``
  (:func:`workspaces.lifecycle.schedule_deletion`).
  The spawner's own ``poll`` checks the permit every 2 s as well, so either path suffices.
* **Amendments** (same poll): an amendment that *narrows* the permit (a dataset, table or
  column no longer granted, or ``pseudonymised`` -> ``dp_only``:
  :func:`workspaces.lifecycle.narrowing`) stops every server of the permit (a running kernel
  may hold data it may no longer see); otherwise ``amended`` stops the permit's servers of
  every person the amendment removed (their permit and workspace tokens were already revoked
  by the permit service); ``issued``, ``amended`` and ``resumed`` align the permit's
  pseudonymised extract with its terms (:func:`workspaces.extracts.sync_extract`: removed
  when the access mode became ``dp_only``, rebuilt when tables or columns changed). Audited
  as ``workspace.permit_amended`` (with what narrowed).
  A changed compute quota (CPUs, memory, GPUs, disk) applies when the server next starts: the
  running one keeps the cgroup limits, GPUs and home size it started with; the researcher (or
  an operator) restarts it to pick up the new quota.
* **Idle culling** (every ``cull_every_seconds``): a server whose last activity is older than
  ``cull_idle_seconds`` is stopped, unless its workspace used at least
  ``cull_busy_cpu_percent`` of a core since the previous round, as the kernel accounts it in
  the workspace's cgroup (Ray tasks, batch jobs: real work, not process names, which the
  workspace controls); then the cull is refused. A server seen for the first time is measured
  first. A server older than ``max_server_lifetime_seconds`` is stopped whatever it does.
  Every decision is audited (``workspace.cull``).
* **Persons** (every ``person_check_seconds``, 5 s by default): each person with a server is
  looked up in Keycloak; one who is gone, disabled, or no longer holds the ``researcher``
  role has every server stopped and every live workspace token revoked (audited as
  ``workspace.cull`` with the reason), so within about 10 s nothing of theirs runs or answers.
  A Keycloak that cannot be reached changes nothing (logged; checked again next round).
  Logging out of the hub ends the browser session only: servers keep running (until culled,
  stopped by the person, or stopped by one of these checks), so a closed tab loses no work.
* **Network tables** (same tick as culling, and at start): every workspace network present
  on the host whose host nftables table is missing (a firewall reload or flush) gets it
  re-installed, audited as an alert (``workspace.network_reinstall``, outcome ``failure``:
  the workspace was protected meanwhile only by the table inside its own namespace).
* **Incident freeze** (every ``events_poll_seconds``): every server of a permit frozen by
  ``spe incident freeze`` is stopped (audited as ``workspace.cull``, reason
  ``incident freeze``); the spawner's poll refuses it as well. Homes are kept for evidence.
* **Retention** (same tick): workspaces whose permit ended without an event seen (e.g. expiry
  noticed only by reading) get a deadline, and :func:`workspaces.lifecycle.purge_due` deletes
  the data past its deadline, audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from sqlalchemy import select

from permits.events import EventKind, poll
from spe.audit import AuditEvent, Outcome, record
from spe.config import Settings, get_settings
from spe.db import Database
from spe.db.base import utcnow
from spe.errors import NotFound
from workspaces import accounts, cgroups, lifecycle, network
from workspaces.extracts import sync_extract
from workspaces.models import WorkspaceRow
from workspaces.settings import WorkspaceSettings, get_workspace_settings

log = logging.getLogger("workspaces.hub_service")
STOPPING = {EventKind.SUSPENDED, EventKind.REVOKED, EventKind.EXPIRED}
ENDING = {EventKind.REVOKED, EventKind.EXPIRED}
EXTRACT_SYNC = {EventKind.ISSUED, EventKind.AMENDED, EventKind.RESUMED}


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class HubService:
    """One instance per hub; every method is safe to call again (idempotent effects)."""

    def __init__(self, settings: Settings, ws: WorkspaceSettings, db: Database,
                 api_url: str, api_token: str) -> None:
        self.settings, self.ws, self.db = settings, ws, db
        self.api_url = api_url.rstrip("/")
        self.http = httpx.AsyncClient(headers={"Authorization": f"token {api_token}"},
                                      timeout=30)
        self.cursor_file = settings.data_dir / "hub" / "permit_events.cursor"
        self._cpu: dict[str, tuple[float, float]] = {}  # ws_id -> (monotonic s, CPU s)
        self._keycloak: Any = None

    # -- hub API ---------------------------------------------------------------------------
    async def servers(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(user, server name, server model) of every server the hub knows."""
        resp = await self.http.get(f"{self.api_url}/users", params={"state": "active"})
        resp.raise_for_status()
        out = []
        for user in resp.json():
            for name, server in (user.get("servers") or {}).items():
                out.append((user["name"], name, server))
        return out

    async def stop_server(self, user: str, name: str) -> None:
        resp = await self.http.delete(
            f"{self.api_url}/users/{quote(user)}/servers/{quote(name)}")
        if resp.status_code not in (202, 204, 404):
            resp.raise_for_status()

    # -- permit events ---------------------------------------------------------------------
    def _cursor(self) -> int:
        try:
            return int(self.cursor_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _save_cursor(self, value: int) -> None:
        tmp = self.cursor_file.with_suffix(".tmp")
        tmp.write_text(str(value))
        tmp.replace(self.cursor_file)

    async def handle_events(self) -> int:
        """Act on new permit events; returns how many were read."""
        after = self._cursor()
        with self.db.read() as session:
            events = poll(session, after, limit=200)
        if not events:
            return 0
        stop = {lifecycle.server_name(e.permit_id) for e in events if e.kind in STOPPING}
        amended = sorted({e.permit_id for e in events if e.kind is EventKind.AMENDED})
        narrowed: dict[str, list[str]] = {}
        for e in events:
            if e.kind is EventKind.AMENDED:
                reasons = await asyncio.to_thread(lifecycle.narrowing, self.db, e.permit_id,
                                                  e.version)
                if reasons:
                    narrowed.setdefault(e.permit_id, []).extend(reasons)
        stop |= {lifecycle.server_name(pid) for pid in narrowed}
        servers = await self.servers() if stop or amended else []
        if stop:
            for user, name, _server in servers:
                if name in stop:
                    log.info("permit %s no longer active: stopping %s/%s", name, user, name)
                    await self.stop_server(user, name)
        unnamed = await asyncio.to_thread(self.unnamed_servers, servers, amended)
        for user, name, pid in unnamed:
            log.info("%s no longer named in permit %s: stopping %s/%s", user, pid, user, name)
            await self.stop_server(user, name)
        extracts: dict[str, str] = {}
        for pid in dict.fromkeys(e.permit_id for e in events if e.kind in EXTRACT_SYNC):
            try:
                extracts[pid] = await asyncio.to_thread(
                    sync_extract, self.db, self.settings, pid)
            except Exception:  # a missing dataset file must not block the other events
                log.exception("extract of permit %s not synchronised", pid)
                extracts[pid] = "failed"
        for pid in amended:
            stopped = [u for u, _n, p in unnamed if p == pid]
            if pid in narrowed:
                stopped = [u for u, n, _s in servers if n == lifecycle.server_name(pid)]
            await asyncio.to_thread(self._audit_amended, pid, stopped,
                                    extracts.get(pid, "none"), narrowed.get(pid, []))
        for event in events:
            if event.kind in ENDING:
                days = await asyncio.to_thread(lifecycle.permit_retention_days, self.db,
                                               event.permit_id)
                await asyncio.to_thread(
                    lifecycle.schedule_deletion, self.db, event.permit_id, ended_at=event.time,
                    retention_days=days, reason=f"permit {event.kind.value}")
        self._save_cursor(events[-1].id)
        return len(events)

    def unnamed_servers(self, servers: list[tuple[str, str, dict[str, Any]]],
                        permit_ids: list[str]) -> list[tuple[str, str, str]]:
        """(user, server name, permit id) of the servers among ``servers`` run under one of
        ``permit_ids`` by a person the permit no longer names."""
        from permits.service import get_terms

        if not permit_ids or not servers:
            return []
        with self.db.read() as session:
            named = {lifecycle.server_name(pid): (pid, get_terms(session, pid).persons)
                     for pid in permit_ids}
        return [(user, name, named[name][0]) for user, name, _server in servers
                if name in named and user not in named[name][1]]

    def _audit_amended(self, permit_id: str, stopped: list[str], extract: str,
                       narrowed: list[str] | None = None) -> None:
        with self.db.write() as session:
            record(session, AuditEvent(
                action="workspace.permit_amended", actor="system", permit_id=permit_id,
                target=permit_id, details={"stopped_servers_of": sorted(set(stopped)),
                                           "extract": extract,
                                           "narrowed": narrowed or []}))

    # -- incident switch -------------------------------------------------------------------
    async def stop_frozen_once(self) -> list[tuple[str, str]]:
        """Stop every server of a permit frozen by the incident switch
        (``spe.audit.incident``; all servers under a freeze of all permits); returns those
        stopped. The spawner's own poll refuses a frozen permit too (``check_use``)."""
        from spe.audit.incident import frozen_state, is_frozen

        def state() -> dict[str, Any]:
            with self.db.read() as session:
                return frozen_state(session)

        frozen = await asyncio.to_thread(state)
        if not frozen["all"] and not frozen["permits"]:
            return []

        def frozen_permit(user: str, name: str) -> tuple[bool, str | None]:
            pid = lifecycle.permit_for_server(self.db, user, name)
            if pid is None:
                return bool(frozen["all"]), None
            with self.db.read() as session:
                return is_frozen(session, pid), pid

        stopped = []
        for user, name, _server in await self.servers():
            hit, pid = await asyncio.to_thread(frozen_permit, user, name)
            if not hit:
                continue
            log.info("permit of %s/%s frozen (incident): stopping", user, name)
            await self.stop_server(user, name)
            ws_id = accounts.workspace_id(user, pid) if pid else f"server:{name}"
            await asyncio.to_thread(self._audit_cull, user, pid, ws_id, Outcome.SUCCESS,
                                    "incident freeze")
            stopped.append((user, name))
        return stopped

    # -- culling ---------------------------------------------------------------------------
    def _audit_cull(self, user: str, permit_id: str | None, ws_id: str, outcome: Outcome,
                    reason: str, **details: Any) -> None:
        with self.db.write() as session:
            record(session, AuditEvent(
                action="workspace.cull", actor="system", permit_id=permit_id,
                target=ws_id, outcome=outcome, reason=reason,
                details={"person": user, **details}))

    def cpu_busy(self, ws_id: str) -> tuple[bool | None, float]:
        """Whether the workspace used at least ``cull_busy_cpu_percent`` of a core since the
        previous call (None: first measurement), and the percentage it used."""
        cg = lifecycle.find_cgroup(ws_id, self.ws.cgroup_parent)
        used = cg.cpu_seconds() if cg is not None else None
        at = time.monotonic()
        previous = self._cpu.get(ws_id)
        if used is None:
            return False, 0.0
        self._cpu[ws_id] = (at, used)
        if previous is None or at <= previous[0]:
            return None, 0.0
        percent = 100.0 * (used - previous[1]) / (at - previous[0])
        return percent >= self.ws.cull_busy_cpu_percent, round(percent, 2)

    async def cull_once(self, now: datetime | None = None) -> list[tuple[str, str]]:
        """Stop idle servers (not those doing real CPU work) and servers past their maximum
        lifetime; returns those stopped."""
        now = now or utcnow()
        limit = timedelta(seconds=self.ws.cull_idle_seconds)
        lifetime = self.ws.max_server_lifetime_seconds
        culled = []
        for user, name, server in await self.servers():
            if not server.get("ready"):
                continue
            permit_id = await asyncio.to_thread(lifecycle.permit_for_server, self.db, user,
                                                name)
            ws_id = accounts.workspace_id(user, permit_id) if permit_id else f"server:{name}"
            busy, percent = await asyncio.to_thread(self.cpu_busy, ws_id)
            started = _parse_time(server.get("started"))
            if lifetime is not None and started is not None and \
                    (now - started).total_seconds() >= lifetime:
                await self.stop_server(user, name)
                self._cpu.pop(ws_id, None)
                await asyncio.to_thread(
                    self._audit_cull, user, permit_id, ws_id, Outcome.SUCCESS,
                    "maximum lifetime", lifetime_seconds=lifetime,
                    age_seconds=int((now - started).total_seconds()))
                culled.append((user, name))
                continue
            last = _parse_time(server.get("last_activity")) or started
            if last is None or now - last < limit:
                continue
            idle_s = int((now - last).total_seconds())
            if busy is None:  # first measurement: decide next round
                continue
            if busy:
                await asyncio.to_thread(self._audit_cull, user, permit_id, ws_id,
                                        Outcome.REFUSED, "busy (CPU)", idle_seconds=idle_s,
                                        cpu_percent=percent)
                continue
            self._cpu.pop(ws_id, None)
            await self.stop_server(user, name)
            await asyncio.to_thread(self._audit_cull, user, permit_id, ws_id, Outcome.SUCCESS,
                                    "idle", idle_seconds=idle_s)
            culled.append((user, name))
        return culled

    # -- persons -------------------------------------------------------------------------
    def person_standing(self, username: str) -> str | None:
        """Why ``username`` may no longer run workspaces (None: still a researcher)."""
        from spe.auth.groups import admin_client

        if self._keycloak is None:
            self._keycloak = admin_client(self.settings)
        admin = self._keycloak
        uid = admin.get_user_id(username)
        if uid is None:
            return "person no longer in Keycloak"
        if not admin.get_user(uid).get("enabled", False):
            return "person disabled in Keycloak"
        roles = {r["name"] for r in admin.get_composite_realm_roles_of_user(uid)}
        if "researcher" not in roles:
            return "researcher role removed"
        return None

    def _revoke_person(self, username: str, reason: str) -> int:
        from spe.auth.models import WorkspaceGrant
        from spe.auth.workspace_tokens import revoke_person_tokens

        with self.db.write() as session:
            permits = session.execute(select(WorkspaceGrant.permit_id).where(
                WorkspaceGrant.username == username,
                WorkspaceGrant.revoked_at.is_(None)).distinct()).scalars().all()
            return sum(revoke_person_tokens(session, pid, [username], reason=reason)
                       for pid in permits)

    async def check_persons_once(self) -> list[tuple[str, str]]:
        """Stop the servers and revoke the tokens of persons who may no longer work;
        returns the servers stopped."""
        servers = await self.servers()
        stopped = []
        for user in sorted({u for u, _n, _s in servers}):
            try:
                reason = await asyncio.to_thread(self.person_standing, user)
            except Exception:  # Keycloak unreachable: change nothing, retry next round
                log.exception("could not check %s in Keycloak", user)
                self._keycloak = None
                continue
            if reason is None:
                continue
            names = [n for u, n, _s in servers if u == user]
            for name in names:
                await self.stop_server(user, name)
                stopped.append((user, name))
            revoked = await asyncio.to_thread(self._revoke_person, user, reason)
            for name in names:
                permit_id = await asyncio.to_thread(lifecycle.permit_for_server, self.db,
                                                    user, name)
                ws_id = (accounts.workspace_id(user, permit_id) if permit_id
                         else f"server:{name}")
                await asyncio.to_thread(self._audit_cull, user, permit_id, ws_id,
                                        Outcome.SUCCESS, reason, revoked_tokens=revoked)
        return stopped

    # -- network -------------------------------------------------------------------------
    def check_network_once(self) -> list[str]:
        """Re-install missing host tables of workspace networks; returns their ws ids."""
        nets = network.discover(self.ws.allowed_host_ports,
                                max_connections=self.ws.max_connections)
        fixed = []
        for net in network.missing_host_tables(nets):
            network.install_host_table(net)
            log.warning("host nftables table of workspace %s was missing: re-installed",
                        net.ws_id)
            with self.db.write() as session:
                record(session, AuditEvent(
                    action="workspace.network_reinstall", actor="system", target=net.ws_id,
                    outcome=Outcome.FAILURE, reason="host firewall table missing",
                    details={"table": net.table, "reinstalled": True}))
            fixed.append(net.ws_id)
        return fixed

    # -- retention -------------------------------------------------------------------------
    def schedule_ended(self, now: datetime | None = None) -> list[str]:
        """Give a deadline to workspaces whose permit ended without an event seen."""
        from permits.service import get_terms
        from permits.terms import PermitStatus

        now = now or utcnow()
        with self.db.read() as session:
            rows = session.execute(select(WorkspaceRow.permit_id).where(
                WorkspaceRow.delete_after.is_(None),
                WorkspaceRow.state != "deleted").distinct()).scalars().all()
            ended = []
            for permit_id in rows:
                try:
                    terms = get_terms(session, permit_id, now)
                except NotFound:  # one bad row must not stop retention for every other one
                    log.warning("workspace rows name permit %r, which does not exist: left "
                                "for the operator", permit_id)
                    continue
                if terms.status in (PermitStatus.EXPIRED, PermitStatus.REVOKED):
                    at = terms.valid_until if terms.status is PermitStatus.EXPIRED else now
                    ended.append((permit_id, min(at, now), terms.status.value,
                                  terms.retention_days))
        done = []
        for permit_id, at, status, days in ended:
            done += lifecycle.schedule_deletion(self.db, permit_id, ended_at=at,
                                                retention_days=days, reason=f"permit {status}")
        return done

    def retention_once(self, now: datetime | None = None) -> list[str]:
        self.schedule_ended(now)
        return lifecycle.purge_due(self.db, self.settings.data_dir, now=now)

    # -- loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        next_cull = next_persons = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.handle_events()
                await self.stop_frozen_once()
                if loop.time() >= next_persons:
                    next_persons = loop.time() + self.ws.person_check_seconds
                    await self.check_persons_once()
                if loop.time() >= next_cull:
                    next_cull = loop.time() + self.ws.cull_every_seconds
                    await asyncio.to_thread(self.check_network_once)
                    await self.cull_once()
                    await asyncio.to_thread(self.retention_once)
            except Exception:  # keep serving; the next round retries
                log.exception("hub service round failed")
            await asyncio.sleep(self.ws.events_poll_seconds)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cgroups.protect_service()
    settings = get_settings()
    service = HubService(settings, get_workspace_settings(), Database(
        settings.resolved_database_url), os.environ["JUPYTERHUB_API_URL"],
        os.environ["JUPYTERHUB_API_TOKEN"])
    Path(service.cursor_file).parent.mkdir(parents=True, exist_ok=True)
    log.info("workspace service started at %s", datetime.now(UTC).isoformat())
    with contextlib.suppress(KeyboardInterrupt):  # the hub stops us with SIGTERM/SIGINT
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        asyncio.run(service.run())


if __name__ == "__main__":
    main()
