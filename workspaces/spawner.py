"""JupyterHub spawner: one sandboxed named server per (researcher, active permit).

The server name *is* the permit id. State machine of one server (every edge audited)::

    stopped --start()--> starting --hub sees it answer--> running
       ^                    |  refused: permit not active or person not named
       |                    v  (audited, nothing created)
       +---- stopping <-----+---- stop() | poll() finds the permit no longer active
                                  | server process exited | culled by the hub

* ``start``: checks the permit (``permits.service.get_terms``: active, names the user), allocates
  the quota's GPUs (:mod:`workspaces.gpu`), brings the runtime up to the code that runs inside
  the sandbox (:func:`workspaces.runtime.ensure_current`, audited), provisions the sandbox
  through its backend (:mod:`workspaces.backend`, ``backend_class``; bubblewrap:
  :mod:`workspaces.sandbox`: account, home, cgroup from the quota, network namespace admitting
  only the hub API and SPE API ports), mints a workspace token bound to (person, permit,
  workspace) and to the workspace's network address (written to ``SPE_TOKEN_FILE`` too, and
  replaced there by ``poll`` well before it expires: :mod:`workspaces.token_refresh`) and starts
  ``jupyterhub-singleuser`` inside the sandbox, listening on the namespace's address. The
  Keycloak token never enters the workspace; ``SPE_API_URL``, ``SPE_TOKEN`` and
  ``SPE_PERMIT_ID`` let ``spe.client.connect()`` work without arguments; ``SPE_RAY_*`` let
  it start a private Ray head.
* ``poll`` (every ``poll_interval`` = 2 s): returns an exit status when the process died or
  when the permit is no longer active; in the latter case it first stops everything, so a
  suspended, revoked or expired permit's servers (kernels and Ray heads included, they share
  the cgroup) are gone within a few seconds.
* ``stop``: kills every process in the workspace cgroup, releases the GPUs, revokes the
  workspace's tokens, removes the namespace and the account. The home is kept (retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jupyterhub.spawner import Spawner
from tornado import web
from traitlets import Integer, Type, Unicode

from permits.terms import PermitTerms
from spe.audit import AuditEvent, Outcome, record
from spe.config import Settings, get_settings
from spe.db import Database
from spe.errors import NotFound
from spe.tls import WORKSPACE_API_HOST
from workspaces import accounts, cgroups, gpu, lifecycle, runtime, token_refresh
from workspaces.backend import BubblewrapBackend, SandboxBackend, SandboxRequest, check_backend
from workspaces.errors import (
    DiskAdmissionRefused,
    GpuUnavailable,
    NotNamedInPermit,
    PermitNotUsable,
    StaleRuntime,
    UnsupportedArchitecture,
)
from workspaces.ray_head import ray_env, write_token
from workspaces.sandbox import CA_IN_SANDBOX
from workspaces.settings import WorkspaceSettings, get_workspace_settings

_DBS: dict[str, Database] = {}


def _db(settings: Settings) -> Database:
    url = settings.resolved_database_url
    if url not in _DBS:
        _DBS[url] = Database(url)
    return _DBS[url]


def check_permit(db: Database, person: str, permit_id: str) -> PermitTerms:
    """The permit's terms if ``person`` may run a workspace under it now
    (``permits.policy.check_use``, the rule DP queries follow too); else raise."""
    from permits.policy import check_use
    from permits.service import get_terms

    with db.read() as session:
        terms = get_terms(session, permit_id)
    check_use(person, terms)
    return terms


@dataclass(frozen=True)
class _Stopping:
    """A sandbox being torn down, with the identity it ran under."""

    ws: Any
    person: str
    permit_id: str
    ws_id: str


def _audit(db: Database, action: str, person: str, permit_id: str | None, ws_id: str,
           outcome: Outcome = Outcome.SUCCESS, reason: str | None = None,
           **details: Any) -> None:
    with db.write() as session:
        record(session, AuditEvent(action=action, actor=person, role="researcher",
                                   permit_id=permit_id, target=ws_id, outcome=outcome,
                                   reason=reason, details=details))



def workspace_api_env(host_url: str, tls: bool) -> dict[str, str]:
    """The workspace's SPE API address and the CA it trusts. ``host_url`` is the backend's
    plain address of the API's port; with ``tls`` (the hub has ``tls_ca_file``, which
    :func:`spe.cli.production.hub_tls_env` sets when the API serves HTTPS) the address becomes
    ``https://`` + :data:`spe.tls.WORKSPACE_API_HOST` (mapped to the same host address in the
    sandbox's /etc/hosts, named by the certificate) and the clients trust only the CA copied
    read-only to :data:`workspaces.sandbox.CA_IN_SANDBOX`."""
    if not tls:
        return {"SPE_API_URL": host_url}
    port = urlsplit(host_url).port
    return {"SPE_API_URL": f"https://{WORKSPACE_API_HOST}:{port}",
            "SSL_CERT_FILE": CA_IN_SANDBOX, "REQUESTS_CA_BUNDLE": CA_IN_SANDBOX}

class SandboxSpawner(Spawner):
    """Spawns ``jupyterhub-singleuser`` inside the workspace sandbox of (user, permit)."""

    port = Integer(8888, config=True, help="Port of the server inside its namespace.")
    server_command = Unicode("jupyterhub-singleuser", config=True,
                             help="Command (in the runtime's bin) of the single-user server.")
    backend_class = Type(BubblewrapBackend, klass=object, config=True,
                         help="The sandbox backend (workspaces.backend.SandboxBackend contract), "
                         "built as backend_class(workspace_settings, workspaces_dir). Enforced: "
                         "a class without every method of the contract is refused at start.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poll_interval = 2
        self._ws: Any = None  # the backend's handle (workspaces.backend.SandboxHandle)
        self._backend: SandboxBackend[Any] | None = None
        cgroups.protect_service()  # the hub process: the OOM killer takes workspaces first
        self._proc: Any = None
        self._started_at = 0.0
        self._stale_ws: str | None = None
        self._extra_env: dict[str, str] = {}
        self._permit_id = ""
        self._token = ""
        self._token_at = 0.0
        self._stopping: asyncio.Future[None] | None = None  # the teardown in progress

    # -- helpers ---------------------------------------------------------------------------
    @property
    def spe_settings(self) -> Settings:
        return get_settings()

    @property
    def ws_settings(self) -> WorkspaceSettings:
        return get_workspace_settings()

    @property
    def backend(self) -> SandboxBackend[Any]:
        if self._backend is None:
            self._backend = check_backend(self.backend_class(
                self.ws_settings, self.spe_settings.data_dir / "workspaces"))
        return self._backend

    @property
    def permit_id(self) -> str:
        """The permit this server runs under (resolved from the server name at start)."""
        return self._permit_id

    def _resolve_permit(self, db: Database) -> str:
        """The permit whose server name this is, among the active permits naming the user."""
        wanted = (self.user_options or {}).get("permit")
        if not self.name:
            raise PermitNotUsable("Start a named server per permit (see the spawn page).")
        for pid, _ref in lifecycle.permits_naming(db, self.person):
            if lifecycle.server_name(pid) == self.name:
                if wanted and wanted != pid:
                    raise PermitNotUsable("The server name and the chosen permit differ.")
                return pid
        raise PermitNotUsable(f"No active permit naming {self.person} has server name "
                              f"{self.name!r}.")

    @property
    def person(self) -> str:
        return str(self.user.name)

    @property
    def ws_id(self) -> str:
        return accounts.workspace_id(self.person, self.permit_id)

    async def get_options_form(self) -> str:
        """The permits naming the user: exactly the servers the user may start."""
        permits = await asyncio.to_thread(lifecycle.permits_naming, _db(self.spe_settings),
                                          self.person)
        if not permits:
            return ("<p>You are named in no active permit: there is no workspace to start. "
                    f"Ask your data access body.</p>{NO_START_BUTTON}")
        base = html.escape(self.user.url)
        items = "".join(
            # a path on the hub's own origin: with per-server hosts (subdomain_host) the
            # user's URL is on a workspace host, whose gate serves no hub page
            f'<li><a href="{html.escape(self.user.base_url.replace("/user/", "/hub/spawn/", 1))}'
            f'{lifecycle.server_name(pid)}">{html.escape(ref)} ({html.escape(pid)})</a></li>'
            for pid, ref in permits)
        if self.name:
            options = "".join(
                f'<option value="{html.escape(pid)}"'
                f'{" selected" if lifecycle.server_name(pid) == self.name else ""}>'
                f"{html.escape(ref)} ({html.escape(pid)})</option>"
                for pid, ref in permits if lifecycle.server_name(pid) == self.name)
            return (f'<label for="permit">Permit</label><select name="permit" id="permit">'
                    f"{options}</select><p>One workspace per permit ({base}).</p>")
        return f"<p>One workspace per permit. Start one:</p><ul>{items}</ul>{NO_START_BUTTON}"

    def run_options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, str]:
        permit = (formdata.get("permit") or [""])[0]
        return {"permit": permit} if permit else {}

    def _refuse(self, db: Database, exc: Exception) -> web.HTTPError:
        _audit(db, "workspace.spawn", self.person, self.permit_id or None,
               self.ws_id if self.permit_id else f"server:{self.name or '(default)'}",
               Outcome.REFUSED, str(exc))
        if self.permit_id:
            with contextlib.suppress(Exception):
                lifecycle.record_state(db, person=self.person, permit_id=self.permit_id,
                                       state="refused", error=str(exc))
        status = 409 if isinstance(exc, GpuUnavailable | DiskAdmissionRefused) else 403
        return web.HTTPError(status, str(exc))

    def _prepare_sync(self) -> PermitTerms:
        """Check, allocate, provision: everything but starting the process."""
        db = _db(self.spe_settings)
        try:
            self._permit_id = self._resolve_permit(db)
            terms = check_permit(db, self.person, self.permit_id)
        except (PermitNotUsable, NotNamedInPermit, NotFound) as exc:
            raise self._refuse(db, exc) from exc
        if self._stale_ws:  # left over by a hub that stopped without stopping us
            with contextlib.suppress(Exception):
                lifecycle.cleanup_leftovers(
                    self._stale_ws, self.ws_settings.cgroup_parent,
                    self.spe_settings.data_dir / "workspaces" / self._stale_ws)
            self._stale_ws = None
        rebuilt = False
        try:  # code that runs inside the sandbox is never older than the hub's (issue 10)
            rebuilt = self.ws_settings.runtime_dir.is_dir() and runtime.ensure_current(
                self.ws_settings.runtime_dir)
        except (StaleRuntime, UnsupportedArchitecture) as exc:
            raise self._refuse(db, exc) from exc
        lifecycle.record_state(db, person=self.person, permit_id=self.permit_id,
                               state="starting")
        try:
            gpus = gpu.allocate(db, workspace_id=self.ws_id, permit_id=self.permit_id,
                                person=self.person, count=terms.compute.gpus,
                                settings=self.ws_settings, actor=self.person)
        except GpuUnavailable as exc:
            raise self._refuse(db, exc) from exc
        extract = self.spe_settings.data_dir / "extracts" / self.permit_id.replace("-", "_")
        try:
            self._ws = self.backend.provision(SandboxRequest(
                ws_id=self.ws_id, person=self.person, permit_id=self.permit_id,
                quota=terms.compute, extract=extract if extract.is_dir() else None,
                devices=gpu.device_nodes(gpus), server_port=self.port,
                ca_file=self.spe_settings.tls_ca_file))
            write_token(self._ws.home_on_host, self._ws.uid, self._ws.gid)
            self._extra_env = {**ray_env(terms.compute, gpus), **self._token_env(db, self._ws)}
        except (UnsupportedArchitecture, DiskAdmissionRefused) as exc:
            self._teardown(db, reason="start refused")
            raise self._refuse(db, exc) from exc
        except BaseException:
            self._teardown(db, reason="start failed")
            raise
        _audit(db, "workspace.spawn", self.person, self.permit_id, self.ws_id,
               gpus=list(gpus), cpus=terms.compute.cpus, memory_mb=terms.compute.memory_mb,
               disk_mb=disk.size_mb if (disk := getattr(self._ws, "disk", None)) else None,
               disk_mb_requested=terms.compute.disk_mb, backend=self.backend.name,
               runtime_rebuilt=rebuilt)
        return terms

    def _token_env(self, db: Database, ws: Any) -> dict[str, str]:
        """The first workspace token, bound to the workspace's address and also written to
        the token file the client reads (refreshed by ``poll``: workspaces.token_refresh)."""
        self._refresh_token(db, ws)
        return {"SPE_TOKEN": self._token, "SPE_TOKEN_FILE": token_refresh.token_path(
            ws.home_in_sandbox)}

    def _refresh_token(self, db: Database, ws: Any) -> None:
        minted = token_refresh.mint(
            db, self.spe_settings, person=self.person, permit_id=self.permit_id,
            ws_id=ws.ws_id, address=self.backend.address(ws, self.port)[0])
        token_refresh.write_token_file(ws.home_on_host, ws.uid, ws.gid, minted.token)
        self._token, self._token_at = minted.token, time.monotonic()

    def _take_for_teardown(self) -> _Stopping:
        """What a teardown needs, taken at once and cleared from the spawner: the hub may
        clear its state (``clear_state``: permit, so workspace id) while the teardown runs."""
        taken = _Stopping(ws=self._ws, person=self.person, permit_id=self._permit_id,
                          ws_id=self.ws_id)
        self._ws, self._proc = None, None
        return taken

    def _teardown(self, db: Database, reason: str, taken: _Stopping | None = None) -> None:
        """Destroy the sandbox, release its GPUs, revoke its tokens, record it stopped."""
        t = taken or self._take_for_teardown()
        if t.ws is not None:
            with contextlib.suppress(Exception):
                self.backend.destroy(t.ws)
        gpu.release(db, t.ws_id, actor=t.person)
        from spe.auth.workspace_tokens import revoke_workspace_tokens

        with db.write() as session:
            revoke_workspace_tokens(session, t.ws_id, reason=f"workspace stopped: {reason}")
        with contextlib.suppress(Exception):
            lifecycle.record_state(db, person=t.person, permit_id=t.permit_id,
                                   state="stopped", error=None if reason == "stopped" else reason)
        _audit(db, "workspace.stop", t.person, t.permit_id, t.ws_id, reason=reason,
               at=datetime.now(UTC).isoformat())

    async def _teardown_once(self, reason: str) -> None:
        """The teardown, from the event loop, run once: a caller that comes while one runs
        (the hub's stop beside its poll, or the other way round) waits for that one, so the
        hub never sees the server stopped before its sandbox is gone and recorded. With no
        sandbox and no teardown running (another caller finished it meanwhile, and the hub
        may have cleared the permit since), there is nothing left to tear down or record."""
        if self._stopping is None and self._ws is None:
            return
        if self._stopping is None:
            taken = self._take_for_teardown()
            self._stopping = asyncio.ensure_future(asyncio.to_thread(
                self._teardown, _db(self.spe_settings), reason, taken))
            self._stopping.add_done_callback(self._stopped)
        await asyncio.shield(self._stopping)

    def _stopped(self, done: asyncio.Future[None]) -> None:
        if self._stopping is done:
            self._stopping = None

    # -- Spawner API -----------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        await asyncio.to_thread(self._prepare_sync)
        ws, backend = self._ws, self.backend
        assert ws is not None and ws.runtime is not None
        # Everything of the hub the server needs, addressed through the backend: the hub API
        # and the SPE API (backend.host_url). Nothing else.
        self.ip, self.port = backend.address(ws, self.port)
        self.hub_connect_url = backend.host_url(ws, self.ws_settings.allowed_host_ports[0])
        env = {**self.get_env(), **self._extra_env,
               **workspace_api_env(backend.host_url(ws, self.spe_settings.api_port),
                                   self.spe_settings.tls_ca_file is not None),
               "SPE_PERMIT_ID": self.permit_id,
               "JUPYTERHUB_COOKIE_OPTIONS": json.dumps(server_cookie_options(
                   self.cookie_options))}
        cmd = [str(ws.runtime / "bin" / self.server_command),
               f"--ip={self.ip}", f"--port={self.port}",
               "--ServerApp.root_dir=" + ws.home_in_sandbox, *self.args]
        # Started from the event-loop thread: bwrap's --die-with-parent follows the thread
        # that forked it, and this one lives as long as the hub.
        try:
            self._proc = backend.start(ws, cmd, env=env, log=ws.root / "server.log")
            self._started_at = time.monotonic()
        except BaseException:
            await self._teardown_once("start failed")
            raise
        await asyncio.to_thread(lifecycle.record_state, _db(self.spe_settings),
                                person=self.person, permit_id=self.permit_id, state="running")
        return self.ip, self.port

    async def poll(self) -> int | None:
        if self._proc is None:
            return 0
        code = self._proc.poll()
        if code is not None:
            if time.monotonic() - self._started_at <= START_LOG_WINDOW_S:
                # A server that dies while starting: surface its own log (DESIGN §10).
                self.log.error("Workspace %s server exited with %s while starting; its log:"
                               "\n%s", self.ws_id, code,
                               server_log(self.spe_settings.data_dir, self.ws_id))
            else:
                # Later, the log holds whatever the researcher's code printed, which may be
                # data: it stays in the workspace's own file, never in the hub's log.
                self.log.error("Workspace %s server exited with %s", self.ws_id, code)
            await self._teardown_once(f"server exited ({code})")
            return int(code)
        try:
            await asyncio.to_thread(check_permit, _db(self.spe_settings), self.person,
                                    self.permit_id)
        except (PermitNotUsable, NotNamedInPermit, NotFound) as exc:
            await self._teardown_once(str(exc))
            return 1
        ws = self._ws
        every = token_refresh.refresh_interval(self.spe_settings)
        if ws is not None and time.monotonic() - self._token_at >= every:
            try:
                await asyncio.to_thread(self._refresh_token, _db(self.spe_settings), ws)
            except Exception:  # e.g. a full home: retry in 30 s, the old token is still valid
                self._token_at = time.monotonic() - every + 30
                self.log.exception("Workspace %s: token refresh failed", self.ws_id)
        return None

    async def stop(self, now: bool = False) -> None:
        if self._ws is not None or self._stopping is not None:
            await self._teardown_once("stopped")

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self._ws is not None:
            state["ws_id"] = self._ws.ws_id
            state["permit_id"] = self._permit_id
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        # Sandboxes do not survive a hub restart (die-with-parent): nothing to reattach, but
        # what they left (cgroup, namespace, account) is removed before the next start.
        self._stale_ws = state.get("ws_id")
        self._permit_id = state.get("permit_id", "")

    def clear_state(self) -> None:
        super().clear_state()
        self._ws = None
        self._proc = None
        self._permit_id = ""


#: Seconds after start within which a dead server's log is copied to the hub log.
START_LOG_WINDOW_S = 60.0


#: Hides the spawn page's *Start* button where the form names no permit (the list of permits,
#: or none): there it could only try the unnamed default server, which every user is refused.
NO_START_BUTTON = "<style>#spawn_form .feedback-container { display: none; }</style>"


def server_cookie_options(hub_options: dict[str, Any]) -> dict[str, Any]:
    """The hub's cookie options for a workspace server's cookies, with ``SameSite=Lax``.

    The workspace is on its own site (``*.localhost``, a workspace domain), so opening it from
    the hub (a link, the spawn page's redirect) is a cross-site navigation: a ``Strict`` OAuth
    state cookie would never come back with the hub's redirect to ``oauth_callback`` and the
    server would answer 403 ("oauth state does not match"). ``Lax`` is sent on top-level
    ``GET`` navigations only, never on cross-site subrequests or ``POST``s (and Jupyter's API
    needs its XSRF token anyway); the hub's own cookies stay ``Strict``.
    """
    return {**hub_options, "SameSite": "Lax"}


def server_log(data_dir: Path, ws_id: str) -> str:
    """The server's own log (surface it instead of the hub's misleading 500 on start failure)."""
    path = data_dir / "workspaces" / ws_id / "server.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""
