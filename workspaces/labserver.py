"""The Jupyter server extension of a workspace: the enclave's rules, seen from JupyterLab.

Runs *inside* the sandbox, in the researcher's single-user server (the runtime enables it in
``etc/jupyter/jupyter_server_config.d``). The JupyterLab panel asks it, never the SPE API: it
holds the workspace token (through :func:`spe.client.connect`, which reads the newest token from
``SPE_TOKEN_FILE``, i.e. ``~/.spe/token``, on every request), so the token never reaches the
browser.

Contract (every route needs the server's own login, like the rest of JupyterLab's API):

- ``GET  <base_url>spe/overview``: ``{"permit", "budget", "queries", "exports"}`` where
  ``permit`` holds only what the panel shows (reference, title, status, period, datasets with
  their tables and columns, access mode, conditions), ``budget`` the permit's privacy budget,
  ``queries`` the permit's recent DP queries with their cost (newest first, from the
  budget's charges), and ``exports`` this permit's export requests (state, files, checks,
  shared comments). A part the API refuses is
  ``{"error": {"status": ..., "title": ..., "detail": ...}}`` instead, so a suspended permit
  still shows what can be shown.
- ``POST <base_url>spe/exports`` with ``{"paths": [...], "justification": "..."}``: files of the
  server's root directory (paths as the file browser names them, relative to the root; a path
  leaving the root, a link or a directory is refused with 400) sent through the airlock
  (:meth:`spe.client.Client.export`); answers the request as the API returns it (201), or the
  API's refusal with its status.

Answers never carry the workspace token or the API's address; errors carry the API's problem
title and detail only.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from spe.client import Client, SPEClientError, connect

#: The permit's fields the panel shows (nothing else of the permit is passed to the browser).
PERMIT_FIELDS = ("id", "reference", "title", "status", "valid_from", "valid_until", "datasets",
                 "access_mode", "conditions", "retention_days")
MAX_FILES = 20


def _error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, SPEClientError):
        return {"error": {"status": exc.status, "title": exc.problem.get("title", "Error"),
                          "detail": exc.problem.get("detail", "")}}
    return {"error": {"status": 502, "title": "The SPE API cannot be reached",
                      "detail": type(exc).__name__}}


def _overview(client: Client) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, read in (("permit", _permit), ("budget", _budget), ("queries", _queries),
                      ("exports", _exports)):
        try:
            out[key] = read(client)
        except Exception as exc:  # noqa: BLE001 - one part refused, the others still shown
            out[key] = _error(exc)
    return out


def _permit(client: Client) -> dict[str, Any]:
    permit = client.permit()
    return {k: permit.get(k) for k in PERMIT_FIELDS}


def _budget(client: Client) -> dict[str, Any]:
    return dict(client.budget(plot=False).data)


def _queries(client: Client) -> list[dict[str, Any]]:
    return client.queries()


def _exports(client: Client) -> list[dict[str, Any]]:
    return client.exports()


class _Base(APIHandler):
    def _client(self) -> Client:
        client = self.settings.get("spe_client")
        if client is None:
            client = connect()
            self.settings["spe_client"] = client
        return client  # type: ignore[no-any-return]

    def _reply(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))


class OverviewHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        try:
            client = self._client()
        except SPEClientError as exc:
            self._reply(503, _error(exc))
            return
        self._reply(200, await asyncio.to_thread(_overview, client))


class ExportHandler(_Base):
    @web.authenticated
    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
            paths, justification = body["paths"], body["justification"]
            if (not isinstance(paths, list) or not paths or len(paths) > MAX_FILES
                    or not all(isinstance(p, str) for p in paths)
                    or not isinstance(justification, str) or not justification.strip()):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._reply(400, {"error": {"status": 400, "title": "Bad request",
                                        "detail": "send paths (1 to 20 files) and a "
                                                  "justification"}})
            return
        root = Path(self.settings.get("server_root_dir", ".")).expanduser().resolve()
        files: list[Path] = []
        for name in paths:
            candidate = root / name.lstrip("/")
            resolved = candidate.resolve()
            if (not resolved.is_relative_to(root) or candidate.is_symlink()
                    or not resolved.is_file()):
                self._reply(400, {"error": {"status": 400, "title": "Not a file of the "
                                            "workspace", "detail": "only regular files under "
                                            "the workspace's root can be exported"}})
                return
            files.append(resolved)
        try:
            client = self._client()
            request = await asyncio.to_thread(client.export, list(files), justification.strip())
        except Exception as exc:  # noqa: BLE001 - the API's refusal, passed on without secrets
            err = _error(exc)
            self._reply(int(err["error"]["status"]) or 502, err)
            return
        self._reply(201, request)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "workspaces.labserver"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    base = web_app.settings["base_url"]
    web_app.add_handlers(".*$", [
        (url_path_join(base, "spe", "overview"), OverviewHandler),
        (url_path_join(base, "spe", "exports"), ExportHandler),
    ])
