"""The browser gate: one origin per workspace, and the browser is not an export path.

Researchers' code controls the single-user server (it can replace ``jupyterhub-singleuser``
with any HTTP server on the same port), so no limit on what reaches the browser can live inside
the sandbox. The gate is the public HTTP listener of the hub, outside every sandbox, in front of
configurable-http-proxy (which listens on loopback only). It runs as a JupyterHub managed
service (``python -m workspaces.browser_gate``).

Contract
--------
* **Origins.** The hub is served on its own host (``SPE_GATE_HUB_HOST``, e.g. ``127.0.0.1`` or
  ``hub.example.org``). Every (researcher, permit) server is served on its own host
  ``<server>--<user>.<user domain>`` (:func:`workspace_host`), a different origin from the hub
  and from every other workspace, another permit of the same researcher included. JupyterHub runs
  in subdomain mode (``<user>.<user domain>``, host routing in the proxy); the gate forwards a
  workspace host's requests to the proxy under the user's JupyterHub domain, and only for paths
  under ``/user/<user>/<server>/``. A request on a JupyterHub user domain is redirected to the
  workspace host of the path's server; any other host, path or label is refused (404, audited;
  refusals naming no workspace at most once a minute, with their count).
  Workspace responses lose CORS headers and cookie ``Domain`` attributes; CORS preflights and
  websockets from another origin are refused.
* **No download routes.** ``/files/``, ``/view/``, ``/nbconvert/`` (export-as), ``/api/nbconvert``
  exports and any ``download`` query parameter are refused (403, audited as
  ``workspace.browser_blocked``) before the server sees them (:func:`blocked_reason`).
* **A byte budget.** Every byte of every response body and websocket message a workspace sends
  towards the browser is counted against ``WorkspaceSettings.browser_budget_bytes`` per
  workspace per UTC day (progress audited at every tenth as ``workspace.browser_egress``). The
  response that crosses the budget is cut off; the workspace is paused (its server stopped
  through the hub API, audited ``workspace.pause``), an alert is raised
  (``workspace.browser_budget_exceeded``, logged at CRITICAL) and every later request to that
  workspace that day is refused, across server restarts and gate restarts (the count is read
  back from the audit log).
* **Uploads** (``PUT``/``POST`` under ``/api/contents/``) are audited (``workspace.browser_upload``:
  path, size, chunk) and refused (413, audited) when one request body, or the chunks of one
  chunked upload together, exceed ``WorkspaceSettings.upload_max_bytes``; a websocket message
  towards the workspace over that size closes the socket (1009, audited).
* The gate's access log holds method, status and path only: no query string (OAuth codes and
  states), no host.
* JupyterLab's own application files (``/static/lab/``: hashed, immutable scripts and styles,
  the bulk of a page load) are served by the gate from the workspace runtime, which the
  sandbox cannot write, and are not counted: they cannot carry data. Whatever the server would
  have answered there is never forwarded.
* Hub traffic is forwarded unchanged and uncounted (the hub is not researcher-controlled).

Environment: ``SPE_GATE_LISTEN`` (public URL the gate binds, e.g. ``http://127.0.0.1:8000``),
``SPE_GATE_UPSTREAM`` (the proxy's loopback URL), ``SPE_GATE_HUB_HOST``,
``SPE_GATE_USER_DOMAIN`` (default ``localhost``), optional ``SPE_GATE_SSL_CERT`` and
``SPE_GATE_SSL_KEY`` (a wildcard certificate for the user domain and the hub's), plus the hub's
``JUPYTERHUB_API_URL``/``JUPYTERHUB_API_TOKEN`` and the SPE settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import os
import posixpath
import re
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlparse

from tornado import httpclient, httputil, web, websocket
from tornado.httpserver import HTTPServer

from spe.audit import AuditEvent, Outcome, record
from spe.config import get_settings
from spe.db import Database
from workspaces import accounts, lifecycle
from workspaces.settings import WorkspaceSettings, get_workspace_settings

log = logging.getLogger("workspaces.browser_gate")

#: Hub server names: ``p`` + 29 hex digits (:func:`workspaces.lifecycle.server_name`).
SERVER_RE = re.compile(r"^p[0-9a-f]{29}$")
#: User names the gate can put in a DNS label unchanged (anything else is refused).
USER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,29}[a-z0-9])?$")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "content-length"}
CORS_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials",
                "access-control-allow-methods", "access-control-allow-headers",
                "access-control-expose-headers", "access-control-max-age",
                "access-control-allow-private-network")
DOWNLOAD_PREFIXES = ("files/", "view/", "nbconvert/")
LAB_STATIC = "static/lab/"
ANON_AUDIT_SECONDS = 60.0
COOKIE_DOMAIN = re.compile(r";\s*domain=[^;]*", re.IGNORECASE)


# -- pure parts ----------------------------------------------------------------------------
def workspace_label(user: str, server: str) -> str | None:
    """The DNS label of (user, server), or None when it cannot be one (refused)."""
    if not SERVER_RE.match(server) or not USER_RE.match(user) or "--" in user:
        return None
    label = f"{server}--{user}"
    return label if len(label) <= 63 else None


def workspace_host(user: str, server: str, user_domain: str) -> str | None:
    """The host name of the workspace (user, server): its own web origin."""
    label = workspace_label(user, server)
    return f"{label}.{user_domain}" if label else None


@dataclass(frozen=True)
class Target:
    """What a request's host names: ``hub``, ``user`` (a JupyterHub user domain),
    ``workspace`` (one server's origin) or ``unknown``."""

    kind: str
    user: str = ""
    server: str = ""


def classify(host: str, hub_host: str, user_domain: str) -> Target:
    """The target of a request by its host name (port removed, lower case)."""
    host = host.lower().rstrip(".")
    if host == hub_host:
        return Target("hub")
    suffix = "." + user_domain
    if not host.endswith(suffix):
        return Target("unknown")
    label = host[: -len(suffix)]
    if "." in label or not label:
        return Target("unknown")
    server, sep, user = label.partition("--")
    if sep and SERVER_RE.match(server) and workspace_label(user, server) == label:
        return Target("workspace", user, server)
    if not sep and USER_RE.match(label):
        return Target("user", label)
    return Target("unknown")


def normalised(path: str) -> str:
    """``path`` percent-decoded (twice), with ``.``/``..`` and repeated slashes resolved."""
    decoded = unquote(unquote(path))
    norm = posixpath.normpath("/" + decoded.replace("\\", "/").lstrip("/"))
    return norm + ("/" if decoded.endswith("/") and norm != "/" else "")


def blocked_reason(path: str, query: str, prefix: str) -> str | None:
    """Why a request to a workspace is refused as a download route, or None.

    ``path`` is the request path, ``prefix`` the server's ``/user/<user>/<server>/``.
    """
    for candidate in (path, normalised(path)):
        rel = candidate[len(prefix):] if candidate.startswith(prefix) else candidate
        low = rel.lower().lstrip("/")
        for p in DOWNLOAD_PREFIXES:
            if low.startswith(p) or low == p.rstrip("/"):
                return f"download route /{p}"
        if low.startswith("api/nbconvert/") or (low.startswith("api/nbconvert")
                                                 and len(low) > len("api/nbconvert")):
            return "notebook export (nbconvert)"
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key.lower() == "download" and value.lower() not in ("0", "false", "no"):
            return "download query parameter"
    return None


@dataclass
class Usage:
    day: str
    used: int = 0
    audited_steps: int = 0
    paused: bool = False


@dataclass
class Budget:
    """Bytes per workspace per UTC day against ``limit`` (one instance per gate)."""

    limit: int
    steps: int = 10
    usage: dict[str, Usage] = field(default_factory=dict)

    @staticmethod
    def today() -> str:
        return datetime.now(UTC).date().isoformat()

    def get(self, key: str) -> Usage:
        u = self.usage.get(key)
        if u is None or u.day != self.today():
            u = self.usage[key] = Usage(self.today())
        return u

    def charge(self, key: str, n: int) -> tuple[bool, bool]:
        """Count ``n`` bytes; (within budget, a new tenth was crossed)."""
        u = self.get(key)
        u.used += n
        step = min(self.steps, u.used * self.steps // max(self.limit, 1))
        crossed = step > u.audited_steps
        if crossed:
            u.audited_steps = step
        return u.used <= self.limit, crossed


# -- the gate ------------------------------------------------------------------------------
@dataclass
class GateConfig:
    upstream: str
    hub_host: str
    user_domain: str
    public_port: int | None
    scheme: str = "http"


@dataclass
class Workspace:
    user: str
    server: str
    permit_id: str | None
    ws_id: str

    @property
    def key(self) -> str:
        return self.ws_id

    @property
    def prefix(self) -> str:
        return f"/user/{self.user}/{self.server}/"


class Gate:
    """State shared by the handlers: config, budget, audit, pausing."""

    def __init__(self, config: GateConfig, ws_settings: WorkspaceSettings,
                 db: Database | None, stop_server: Callable[[str, str], Awaitable[bool]]
                 ) -> None:
        self.config = config
        self.settings = ws_settings
        self.db = db
        self.budget = Budget(ws_settings.browser_budget_bytes)
        self.stop_server = stop_server
        self.uploads: dict[tuple[str, str], int] = {}
        self.sockets: dict[str, set[ProxyHandler]] = {}
        self._loaded: set[tuple[str, str]] = set()
        self._anonymous: dict[str, tuple[int, float]] = {}

    def origin_host(self, host: str) -> str:
        port = self.config.public_port
        return f"{host}:{port}" if port else host

    def origin(self, host: str) -> str:
        return f"{self.config.scheme}://{self.origin_host(host)}"

    # -- audit (one write path: spe.audit.record in its own transaction) -----------------
    def _audit_sync(self, action: str, ws: Workspace | None, outcome: Outcome,
                    reason: str | None, details: dict[str, Any]) -> None:
        if self.db is None:
            return
        try:
            with self.db.write() as session:
                record(session, AuditEvent(
                    action=action, actor=ws.user if ws else "anonymous", role="researcher",
                    permit_id=ws.permit_id if ws else None,
                    target=ws.ws_id if ws else None, outcome=outcome, reason=reason,
                    details=details))
        except Exception:
            log.exception("could not audit %s", action)

    async def audit(self, action: str, ws: Workspace | None, outcome: Outcome = Outcome.SUCCESS,
                    reason: str | None = None, **details: Any) -> None:
        await asyncio.to_thread(self._audit_sync, action, ws, outcome, reason, details)

    async def audit_anonymous(self, reason: str, host: str) -> None:
        """Refusals that name no workspace (unknown hosts: scanners, typos) are audited at
        most once a minute per reason, with how many there were, so they cannot flood the log."""
        now = time.monotonic()
        count, last = self._anonymous.get(reason, (0, -ANON_AUDIT_SECONDS))
        count += 1
        if now - last < ANON_AUDIT_SECONDS:
            self._anonymous[reason] = (count, last)
            return
        self._anonymous[reason] = (0, now)
        await self.audit("workspace.browser_blocked", None, Outcome.REFUSED, reason,
                         host=host[:200], refused_since_last_entry=count, status=404)

    # -- workspaces ----------------------------------------------------------------------
    async def workspace(self, user: str, server: str) -> Workspace:
        permit_id = None
        if self.db is not None:
            permit_id = await asyncio.to_thread(lifecycle.permit_for_server, self.db, user,
                                                server)
        ws_id = accounts.workspace_id(user, permit_id) if permit_id else f"{user}/{server}"
        ws = Workspace(user, server, permit_id, ws_id)
        await self._load_usage(ws)
        return ws

    def _usage_from_audit(self, ws: Workspace, day: str) -> tuple[int, bool]:
        from sqlalchemy import select

        from spe.audit.models import AuditEntry

        if self.db is None:
            return 0, False
        start = datetime.fromisoformat(day).replace(tzinfo=UTC)
        used, paused = 0, False
        with self.db.read() as session:
            rows = session.execute(select(AuditEntry.action, AuditEntry.details).where(
                AuditEntry.target == ws.ws_id, AuditEntry.time >= start,
                AuditEntry.action.in_(("workspace.browser_egress",
                                       "workspace.browser_budget_exceeded")))).all()
        for action, details in rows:
            used = max(used, int((details or {}).get("used", 0)))
            paused = paused or action == "workspace.browser_budget_exceeded"
        return used, paused

    async def _load_usage(self, ws: Workspace) -> None:
        day = self.budget.today()
        if (ws.key, day) in self._loaded:
            return
        used, paused = await asyncio.to_thread(self._usage_from_audit, ws, day)
        u = self.budget.get(ws.key)
        u.used = max(u.used, used)
        u.paused = u.paused or paused
        u.audited_steps = min(self.budget.steps,
                              u.used * self.budget.steps // max(self.budget.limit, 1))
        self._loaded.add((ws.key, day))

    def paused(self, ws: Workspace) -> bool:
        return self.budget.get(ws.key).paused

    def charge(self, ws: Workspace, n: int) -> bool:
        """Count ``n`` bytes towards the browser; False once the budget is exceeded (the
        first time: pause and alert, in the background)."""
        u = self.budget.get(ws.key)
        if u.paused:
            return False
        ok, crossed = self.budget.charge(ws.key, n)
        if crossed and ok:
            _background(self.audit("workspace.browser_egress", ws, used=u.used,
                                   budget=self.budget.limit, day=u.day))
        if not ok:
            u.paused = True
            _background(self.exceeded(ws, u))
        return ok

    async def exceeded(self, ws: Workspace, u: Usage) -> None:
        log.critical("ALERT: workspace %s (%s) sent %d bytes to browsers today, over the "
                     "budget of %d: pausing it", ws.ws_id, ws.user, u.used, self.budget.limit)
        await self.audit("workspace.browser_budget_exceeded", ws, Outcome.REFUSED,
                         "browser byte budget exceeded", used=u.used, budget=self.budget.limit,
                         day=u.day, alert=True)
        for handler in list(self.sockets.get(ws.key, ())):
            with contextlib.suppress(Exception):
                handler.close(1008, "browser byte budget exceeded")
        stopped = False
        with contextlib.suppress(Exception):
            stopped = await self.stop_server(ws.user, ws.server)
        await self.audit("workspace.pause", ws, Outcome.SUCCESS if stopped else Outcome.FAILURE,
                         None if stopped else "the hub did not stop the server",
                         how="server stopped through the hub API", control="browser budget")


_TASKS: set[asyncio.Future[Any]] = set()


def _background(coro: Awaitable[Any]) -> None:
    """Run ``coro`` without waiting for it (kept referenced until done)."""
    task = asyncio.ensure_future(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def hub_stop_server(user: str, server: str) -> bool:
    """Stop ``user``'s ``server`` through the hub API (the gate's service token)."""
    api = os.environ.get("JUPYTERHUB_API_URL", "").rstrip("/")
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not api or not token:
        return False
    client = httpclient.AsyncHTTPClient()
    resp = await client.fetch(
        f"{api}/users/{quote(user)}/servers/{quote(server)}", method="DELETE",
        headers={"Authorization": f"token {token}"}, raise_error=False, request_timeout=60)
    return resp.code in (202, 204)


class ProxyHandler(websocket.WebSocketHandler):
    """Forwards one request (HTTP or websocket) after the gate's checks (see module)."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT",  # type: ignore[assignment]
                         "OPTIONS")

    def initialize(self, gate: Gate) -> None:
        self.gate = gate
        self.ws: Workspace | None = None
        self.upstream_ws: websocket.WebSocketClientConnection | None = None
        self._upstream_host = ""

    # -- routing and checks --------------------------------------------------------------
    def _refuse(self, status: int, message: str) -> None:
        self.clear()
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(message + "\n")

    async def _route(self) -> bool:
        """Decide; True when the request is to be forwarded (upstream host set)."""
        target = classify(self.request.host_name, self.gate.config.hub_host,
                          self.gate.config.user_domain)
        path = self.request.path
        if target.kind == "hub":
            self._upstream_host = self.request.host
            return True
        if target.kind == "user":
            match = re.match(r"^/user/([^/]+)/([^/?]+)(/.*)?$", path)
            host = match and match.group(1) == target.user and workspace_host(
                target.user, match.group(2), self.gate.config.user_domain)
            if host and self.request.method in ("GET", "HEAD"):
                uri = self.request.uri or path
                self.redirect(self.gate.origin(host) + uri)
                return False
            await self.gate.audit_anonymous("request on a user domain outside a workspace "
                                            "origin", self.request.host_name)
            self._refuse(404, "Not found: open the workspace from the hub's home page.")
            return False
        if target.kind != "workspace":
            await self.gate.audit_anonymous("unknown host", self.request.host_name)
            self._refuse(404, "Not found.")
            return False
        ws = self.ws = await self.gate.workspace(target.user, target.server)
        if not ((path + "/").startswith(ws.prefix)
                and (normalised(path) + "/").startswith(ws.prefix)):
            await self.gate.audit("workspace.browser_blocked", ws, Outcome.REFUSED,
                                  "path outside the workspace's server", status=404)
            self._refuse(404, "Not found on this workspace's origin.")
            return False
        if self.gate.paused(ws):
            await self.gate.audit("workspace.browser_blocked", ws, Outcome.REFUSED,
                                  "workspace paused: browser byte budget exceeded", status=403)
            self._refuse(403, "This workspace is paused: its responses to the browser "
                              "exceeded today's budget. An administrator has been alerted.")
            return False
        if await self._lab_static(ws, path):
            return False
        reason = blocked_reason(path, self.request.query, ws.prefix)
        if reason is not None:
            await self.gate.audit("workspace.browser_blocked", ws, Outcome.REFUSED, reason,
                                  path=path[len(ws.prefix) - 1:][:200], status=403)
            self._refuse(403, f"Refused: {reason}. Nothing leaves a workspace through the "
                              "browser; request an export through the airlock.")
            return False
        origin = self.request.headers.get("Origin")
        own = self.gate.origin(self.request.host_name)
        if self.request.method == "OPTIONS" or (origin and origin != own):
            await self.gate.audit("workspace.browser_blocked", ws, Outcome.REFUSED,
                                  "cross-origin request to a workspace", status=403)
            self._refuse(403, "Cross-origin requests to a workspace are refused.")
            return False
        if not await self._check_upload(ws):
            return False
        self._upstream_host = self.gate.origin_host(f"{ws.user}.{self.gate.config.user_domain}")
        return True

    async def _lab_static(self, ws: Workspace, path: str) -> bool:
        """Serve ``static/lab/<file>`` from the runtime's trusted copy; True when answered."""
        rel = normalised(path)[len(ws.prefix):]
        if not rel.startswith(LAB_STATIC) or self.request.method not in ("GET", "HEAD"):
            return False
        root = (self.gate.settings.runtime_dir / "share" / "jupyter" / "lab" / "static")
        root = root.resolve()
        target = (root / rel[len(LAB_STATIC):]).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            self._refuse(404, "Not found.")
            return True
        data = await asyncio.to_thread(target.read_bytes)
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self.set_header("Content-Type", ctype)
        self.set_header("Cache-Control", "public, max-age=31536000, immutable")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cross-Origin-Resource-Policy", "same-origin")
        self.finish(b"" if self.request.method == "HEAD" else data)
        return True

    async def _check_upload(self, ws: Workspace) -> bool:
        if self.request.method not in ("PUT", "POST") or "/api/contents/" not in (
                self.request.path + "/"):
            return True
        body = self.request.body or b""
        rel = unquote(self.request.path[len(ws.prefix) - 1:])[:300]
        chunk: Any = None
        kind = None
        with contextlib.suppress(ValueError, AttributeError):
            model = json.loads(body)
            chunk, kind = model.get("chunk"), model.get("type")
        key = (ws.key, rel)
        total = len(body) + (self.gate.uploads.get(key, 0)
                             if isinstance(chunk, int) and chunk not in (0, 1) else 0)
        limit = self.gate.settings.upload_max_bytes
        if total > limit:
            self.gate.uploads.pop(key, None)
            await self.gate.audit("workspace.browser_upload", ws, Outcome.REFUSED,
                                  "upload over the size limit", path=rel, bytes=total,
                                  limit=limit, chunk=chunk, status=413)
            self._refuse(413, f"Refused: uploads into a workspace are limited to {limit} bytes.")
            return False
        if isinstance(chunk, int) and chunk not in (-1,):
            self.gate.uploads[key] = total
        else:
            self.gate.uploads.pop(key, None)
        await self.gate.audit("workspace.browser_upload", ws, path=rel, bytes=len(body),
                              total=total, chunk=chunk, type=kind)
        return True

    def _upstream_headers(self) -> httputil.HTTPHeaders:
        headers = httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() in HOP_BY_HOP or name.lower().startswith("sec-websocket"):
                continue
            headers.add(name, value)
        headers["Host"] = self._upstream_host
        if self.request.method == "POST" and "Content-Type" not in headers:
            # tornado's client would add a form content type to a POST without one; an empty
            # value reads as "not specified" upstream, as the browser sent it
            headers["Content-Type"] = ""
        if self.ws is not None and "Origin" in headers:
            headers["Origin"] = f"{self.gate.config.scheme}://{self._upstream_host}"
        return headers

    def _upstream_url(self, scheme: str = "http") -> str:
        base = urlparse(self.gate.config.upstream)
        return f"{scheme}://{base.netloc}{self.request.uri}"

    # -- HTTP ----------------------------------------------------------------------------
    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() == "websocket":
            if await self._route():
                await self._open_upstream_ws()
            return
        await self._http()

    async def _http(self) -> None:
        if not await self._route():
            return
        started = False
        cut = False
        ws = self.ws
        status_line: list[str] = []
        upstream_headers = httputil.HTTPHeaders()

        def on_header(line: str) -> None:
            if line.startswith("HTTP/"):
                status_line[:] = [line]
                upstream_headers.clear()
            elif line.strip():
                upstream_headers.parse_line(line)

        def start() -> None:
            nonlocal started
            if started:
                return
            started = True
            parts = status_line[0].split(" ", 2) if status_line else ["", "502", ""]
            self.set_status(int(parts[1]), parts[2].strip() if len(parts) > 2 else None)
            self._clear_representation_headers()
            self.clear_header("Content-Type")
            self.clear_header("Server")
            for name, value in upstream_headers.get_all():
                low = name.lower()
                if low in HOP_BY_HOP:
                    continue
                if ws is not None and low in CORS_HEADERS:
                    continue
                if ws is not None and low == "set-cookie":
                    value = COOKIE_DOMAIN.sub("", value)
                self.add_header(name, value)
            if ws is not None:
                self.set_header("Cross-Origin-Resource-Policy", "same-origin")

        def on_chunk(chunk: bytes) -> None:
            nonlocal cut
            if cut:
                return
            start()
            if ws is not None and not self.gate.charge(ws, len(chunk)):
                cut = True
                with contextlib.suppress(Exception):
                    self.request.connection.close()  # type: ignore[union-attr]
                return
            self.write(chunk)
            self.flush()

        body = self.request.body if self.request.method in ("POST", "PUT", "PATCH",
                                                            "DELETE") else None
        req = httpclient.HTTPRequest(
            self._upstream_url(), method=self.request.method or "GET",
            headers=self._upstream_headers(), body=body if body is not None else None,
            follow_redirects=False, decompress_response=False, request_timeout=3600,
            connect_timeout=30, header_callback=on_header, streaming_callback=on_chunk,
            allow_nonstandard_methods=True)
        try:
            resp = await httpclient.AsyncHTTPClient(
                max_body_size=1 << 40).fetch(req, raise_error=False)
        except OSError as exc:  # upstream unreachable (StreamClosedError included)
            if not started:
                self._refuse(502, "The workspace's server is not reachable.")
            log.warning("upstream error: %s", type(exc).__name__)
            return
        if cut:
            await self.gate.audit("workspace.browser_blocked", ws, Outcome.REFUSED,
                                  "response cut: browser byte budget exceeded", status=403)
            return
        if not started:
            if resp.code == 599:
                self._refuse(502, "The workspace's server is not reachable.")
                return
            start()
        if not self._finished:
            self.finish()

    async def head(self, *args: Any) -> None:
        await self._http()

    async def post(self, *args: Any) -> None:
        await self._http()

    async def put(self, *args: Any) -> None:
        await self._http()

    async def patch(self, *args: Any) -> None:
        await self._http()

    async def delete(self, *args: Any) -> None:
        await self._http()

    async def options(self, *args: Any) -> None:
        await self._http()

    def check_xsrf_cookie(self) -> None:  # the upstream checks its own XSRF tokens
        return None

    # -- websockets ----------------------------------------------------------------------
    async def _open_upstream_ws(self) -> None:
        protocols = [p.strip() for p in self.request.headers.get(
            "Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        req = httpclient.HTTPRequest(self._upstream_url("ws"), headers=self._upstream_headers(),
                                     connect_timeout=30, request_timeout=3600)
        try:
            self.upstream_ws = await websocket.websocket_connect(
                req, on_message_callback=self._from_upstream, subprotocols=protocols or None,
                max_message_size=1 << 30)
        except (OSError, httpclient.HTTPClientError, websocket.WebSocketError) as exc:
            code = getattr(exc, "code", 502)
            self._refuse(code if isinstance(code, int) and 400 <= code < 600 else 502,
                         "The workspace refused the websocket.")
            return
        await websocket.WebSocketHandler.get(self)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return self.upstream_ws.selected_subprotocol if self.upstream_ws else None

    def check_origin(self, origin: str) -> bool:
        return self.ws is None or origin == self.gate.origin(self.request.host_name)

    def open(self, *args: Any, **kwargs: Any) -> None:
        if self.ws is not None:
            self.gate.sockets.setdefault(self.ws.key, set()).add(self)

    def _from_upstream(self, message: str | bytes | None) -> None:
        if message is None:
            with contextlib.suppress(Exception):
                self.close()
            return
        data = message.encode() if isinstance(message, str) else message
        if self.ws is not None and not self.gate.charge(self.ws, len(data)):
            with contextlib.suppress(Exception):
                self.close(1008, "browser byte budget exceeded")
            return
        with contextlib.suppress(websocket.WebSocketClosedError):
            self.write_message(message, binary=isinstance(message, bytes))

    async def on_message(self, message: str | bytes) -> None:
        limit = self.gate.settings.upload_max_bytes
        if self.ws is not None and len(message) > limit:
            # a message into the workspace is an upload too (e.g. data pasted into a cell)
            await self.gate.audit("workspace.browser_upload", self.ws, Outcome.REFUSED,
                                  "websocket message over the upload limit",
                                  bytes=len(message), limit=limit, status=1009)
            self.close(1009, "message over the workspace's upload limit")
            return
        if self.upstream_ws is not None:
            await self.upstream_ws.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        if self.ws is not None:
            self.gate.sockets.get(self.ws.key, set()).discard(self)
        if self.upstream_ws is not None:
            self.upstream_ws.close()


def log_request(handler: web.RequestHandler) -> None:
    """Access log without the query string (OAuth codes and states travel there) and without
    the host (which names the researcher); errors at warning level."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING
    log.log(level, "%d %s %s %.1fms", status, handler.request.method,
            handler.request.path[:200], 1000.0 * handler.request.request_time())


def make_app(gate: Gate) -> web.Application:
    return web.Application([(r".*", ProxyHandler, {"gate": gate})],
                           websocket_max_message_size=1 << 30, log_function=log_request)


def config_from_env() -> tuple[GateConfig, str]:
    listen = urlparse(os.environ["SPE_GATE_LISTEN"])
    hub_host = os.environ.get("SPE_GATE_HUB_HOST") or (listen.hostname or "127.0.0.1")
    default_port = 443 if listen.scheme == "https" else 80
    port = listen.port or default_port
    return GateConfig(
        upstream=os.environ["SPE_GATE_UPSTREAM"], hub_host=hub_host.lower(),
        user_domain=os.environ.get("SPE_GATE_USER_DOMAIN", "localhost").lower(),
        public_port=None if port == default_port else port, scheme=listen.scheme or "http",
    ), f"{listen.hostname or '127.0.0.1'}:{port}"


async def serve() -> None:
    config, bind = config_from_env()
    ws_settings = get_workspace_settings()
    gate = Gate(config, ws_settings, Database(get_settings().resolved_database_url),
                hub_stop_server)
    ssl_ctx = None
    cert, key = os.environ.get("SPE_GATE_SSL_CERT"), os.environ.get("SPE_GATE_SSL_KEY")
    if cert and key:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cert, key)
    server = HTTPServer(make_app(gate), xheaders=False, ssl_options=ssl_ctx,
                        max_body_size=4 * ws_settings.upload_max_bytes + (1 << 20))
    host, _, port = bind.rpartition(":")
    server.listen(int(port), address=host)
    log.info("browser gate on %s -> %s (hub %s, workspaces *.%s)", bind, config.upstream,
             config.hub_host, config.user_domain)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[gate %(levelname)s] %(message)s")
    asyncio.run(serve())


if __name__ == "__main__":
    main()
