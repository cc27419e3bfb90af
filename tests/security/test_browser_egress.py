"""The browser is not an export path, even for a researcher who replaces the single-user server.

A real stack (SPE API, JupyterHub with the production config, the browser gate, Keycloak
login, a sandboxed server) with a small browser byte budget and upload limit. alice:

1. asks her (honest) Jupyter server for download routes (``/files/``, ``?download=1``,
   ``/nbconvert/``) through her workspace's origin: refused by the gate and audited; the same
   requests sent to the proxy directly, behind the gate, are served (control).
2. uploads within and over the limit: the small one passes and is audited, the large one is
   refused (413) and audited; sent to the proxy directly it is accepted (control).
3. replaces the single-user server: from a notebook she writes a Jupyter config file that
   ``exec``s her own HTTP server on the same address, and restarts the workspace. Her server
   serves an "extract" of 4x the budget. Read from the proxy directly, every byte arrives
   (control); through the gate the response is cut at the budget, the workspace is paused (its
   server stopped), an alert is audited and every later request to the workspace is refused.

Needs what tests/integration/test_hub_keycloak.py needs.
"""

from __future__ import annotations

import contextlib
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.db import Database
from tests.e2e.attacker import replace_server
from tests.e2e.browser import Browser
from tests.e2e.stack import Stack, cookie_header
from tests.integration.test_hub_keycloak import (
    _database,
    _issue,
    _login,
    _server,
    _spawn,
    _xsrf,
    pytestmark,
)
from tests.integration.test_permit_service import register_dataset
from workspaces import accounts

__all__ = ['pytestmark']  # the hub test's requirements apply here too
BUDGET = 2_000_000
UPLOAD_MAX = 300_000
EXTRACT = 4 * BUDGET

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keycloak_url: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("egress")
    gen = _database(tmp)
    url = next(gen)
    db = Database(url)
    db.upgrade()
    register_dataset(db)
    db.dispose()
    st = Stack(data_dir=tmp / "var", database_url=url, keycloak_url=keycloak_url,
               extra_env={"SPE_WS_BROWSER_BUDGET_BYTES": str(BUDGET),
                          "SPE_WS_UPLOAD_MAX_BYTES": str(UPLOAD_MAX)})
    st.data_dir.mkdir()
    try:
        st.start_api()
        st.start_hub()
        yield st
    finally:
        st.stop()
        with contextlib.suppress(StopIteration):
            next(gen)


def _audit(stack: Stack, action: str, target: str) -> list[AuditEntry]:
    db = Database(stack.database_url)
    try:
        with db.read() as s:
            return list(s.execute(select(AuditEntry).where(
                AuditEntry.action == action, AuditEntry.target == target)).scalars())
    finally:
        db.dispose()


def _direct(stack: Stack, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """The same request sent to the proxy itself, behind the gate (the control)."""
    headers = {"Host": f"alice.localhost:{stack.public_port}", **kwargs.pop("headers", {})}
    return httpx.request(method, f"http://127.0.0.1:{stack.proxy_port}{path}", headers=headers,
                         timeout=120, **kwargs)


def _open_workspace(stack: Stack, alice: Browser, name: str) -> tuple[str, dict[str, str]]:
    page = alice.get(f"{stack.hub_url}/user/alice/{name}/lab")
    assert page.status_code == 200, (page.status_code, page.url)
    base = stack.workspace_url("alice", name)
    assert str(page.url).startswith(base)
    return base, _xsrf(alice, f"/user/alice/{name}/")


def _cookie(alice: Browser, name: str) -> str:
    return cookie_header([c for c in alice.http.cookies.jar if c.domain.endswith(".localhost")],
                         f"/user/alice/{name}/")


def test_browser_cannot_export(stack: Stack,
                               client_headers: Callable[[str], dict[str, str]]) -> None:
    alice = _login(stack, "alice")
    pid = _issue(stack, client_headers("hdab-alpha"), ["alice"])
    name = _spawn(stack, alice, "alice", pid)
    ws_id = accounts.workspace_id("alice", pid)
    base, headers = _open_workspace(stack, alice, name)
    prefix = f"/user/alice/{name}"

    # a notebook and a file in the workspace, written through the contents API
    for path, model in (("notes.txt", {"type": "file", "format": "text",
                                       "content": "row-level data"}),
                        ("a.ipynb", {"type": "notebook", "content": {
                            "cells": [], "metadata": {}, "nbformat": 4,
                            "nbformat_minor": 5}})):
        r = alice.request("PUT", f"{base}/api/contents/{path}", json=model, headers=headers)
        assert r.status_code in (200, 201), (r.status_code, r.text)

    # 1. download routes: refused through the gate, served behind it (control)
    routes = ["/files/notes.txt", "/files/notes.txt?download=1",
              "/api/contents/notes.txt?download=1", "/nbconvert/html/a.ipynb?download=true",
              "/view/notes.txt", "/%66iles/notes.txt", "/lab/../files/notes.txt"]
    for route in routes:
        r = alice.get(f"{base}{route}", headers=headers)
        assert r.status_code == 403 and "row-level" not in r.text, (route, r.status_code)
    served = _direct(stack, "GET", f"{prefix}/files/notes.txt", headers={
        "Cookie": _cookie(alice, name)})
    assert served.status_code == 200 and served.text == "row-level data", served.status_code
    blocked = _audit(stack, "workspace.browser_blocked", ws_id)
    assert len([e for e in blocked if e.outcome == "refused"]) >= len(routes)
    # a page of another origin cannot use the workspace either (no CORS, no preflight)
    cross = alice.get(f"{base}/api/contents", headers={**headers, "Origin": stack.hub_url})
    assert cross.status_code == 403

    # 2. uploads: audited; over the limit refused, except behind the gate (control)
    small = {"type": "file", "format": "text", "content": "x" * 1000}
    r = alice.request("PUT", f"{base}/api/contents/small.txt", json=small, headers=headers)
    assert r.status_code in (200, 201), r.text
    big = {"type": "file", "format": "text", "content": "x" * (UPLOAD_MAX + 10)}
    r = alice.request("PUT", f"{base}/api/contents/big.txt", json=big, headers=headers)
    assert r.status_code == 413, (r.status_code, r.text)
    uploads = _audit(stack, "workspace.browser_upload", ws_id)
    assert any(e.outcome == "success" and e.details["path"].endswith("small.txt")
               for e in uploads)
    assert any(e.outcome == "refused" and e.details["path"].endswith("big.txt")
               for e in uploads)
    direct = _direct(stack, "PUT", f"{prefix}/api/contents/big.txt", json=big, headers={
        "Cookie": _cookie(alice, name), **headers})
    assert direct.status_code in (200, 201), (direct.status_code, direct.text)

    # 3. replace the single-user server with one that streams an extract
    replace_server(stack, alice, name, pid, base, {}, headers, setup=textwrap.dedent(f"""
        import os
        with open(os.path.expanduser("~/extract.bin"), "wb") as f:
            f.write(os.urandom({EXTRACT}))
    """))

    # control: behind the gate, the whole extract streams out
    leak = _direct(stack, "GET", f"{prefix}/extract.bin")
    assert leak.status_code == 200 and len(leak.content) == EXTRACT

    # through the gate: cut at the budget, then paused and alerted
    got = 0
    with contextlib.suppress(httpx.HTTPError), alice.http.stream(
            "GET", f"{base}/extract.bin", headers=headers) as resp:
        for chunk in resp.iter_bytes():
            got += len(chunk)
    assert got <= BUDGET, got
    t0 = time.monotonic()
    while _server(stack, alice, "alice", name) is not None:  # paused: the server is stopped
        assert time.monotonic() - t0 < 30, "server still running after the budget alert"
        time.sleep(0.2)
    alerts = _audit(stack, "workspace.browser_budget_exceeded", ws_id)
    assert alerts and alerts[0].details.get("alert") is True and alerts[0].outcome == "refused"
    pauses = _audit(stack, "workspace.pause", ws_id)
    assert pauses and pauses[-1].outcome == "success"
    again = alice.get(f"{base}/extract.bin", headers=headers)
    assert again.status_code == 403 and len(again.content) < 1000
    print(f"\nthrough the gate {got} of {EXTRACT} bytes; behind it {len(leak.content)}")
    assert alerts[0].details["used"] > BUDGET
