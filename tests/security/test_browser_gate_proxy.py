"""The browser gate in front of a server the researcher wrote (no hub, no root needed).

The upstream here plays a replaced single-user server: it answers with CORS headers for
anyone, sets cookies for the parent domain, streams more than the budget over HTTP and over a
websocket. Through the gate: CORS headers and cookie domains are gone, cross-origin requests
are refused, the byte budget cuts both streams and the workspace stays paused (also for a new
gate reading the audit log), chunked uploads are summed against the upload limit. Every check
is also made against the upstream directly (control), where it passes through.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from tornado import httpclient, web, websocket
from tornado.httpserver import HTTPServer

from spe.audit.models import AuditEntry
from spe.db import Database
from workspaces.browser_gate import Gate, GateConfig, make_app, workspace_host
from workspaces.lifecycle import server_name
from workspaces.settings import WorkspaceSettings

SERVER = server_name("11111111-2222-3333-4444-555555555555")
PREFIX = f"/user/alice/{SERVER}"
BUDGET = 200_000
UPLOAD_MAX = 50_000


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Big(web.RequestHandler):
    def get(self) -> None:
        self.set_header("Access-Control-Allow-Origin", "*")
        self.set_header("Access-Control-Allow-Credentials", "true")
        self.add_header("Set-Cookie", "tossed=1; Domain=localhost; Path=/")
        size = int(self.get_argument("size", "1000"))
        for _ in range(size // 10_000):
            self.write(b"x" * 10_000)
        self.write(b"x" * (size % 10_000))


class Contents(web.RequestHandler):
    def put(self, path: str) -> None:
        self.set_status(201)
        self.finish({"path": path, "bytes": len(self.request.body)})


class Stream(websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    async def open(self, *args: Any) -> None:
        for _ in range(3 * BUDGET // 10_000):
            try:
                await self.write_message("y" * 10_000)
            except websocket.WebSocketClosedError:
                return


class Echo(websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    async def on_message(self, message: str | bytes) -> None:
        await self.write_message(message, binary=isinstance(message, bytes))


def _upstream() -> web.Application:
    return web.Application([(rf"{PREFIX}/big", Big),
                            (rf"{PREFIX}/api/contents/(.*)", Contents),
                            (rf"{PREFIX}/api/kernels/k/channels", Stream),
                            (rf"{PREFIX}/api/kernels/e/channels", Echo)])


async def _with_gate(tmp: Path, body: Callable[[str, int, Gate, list[str]],
                                              Awaitable[None]]) -> Database:
    static = tmp / "runtime" / "share" / "jupyter" / "lab" / "static"
    static.mkdir(parents=True)
    (static / "app.js").write_bytes(b"trusted lab code")
    db = Database(f"sqlite:///{tmp / 'control.db'}")
    db.upgrade()
    up_port, gate_port = _port(), _port()
    upstream = HTTPServer(_upstream())
    upstream.listen(up_port, "127.0.0.1")
    stopped: list[str] = []

    async def stop_server(user: str, server: str) -> bool:
        stopped.append(f"{user}/{server}")
        return True

    def new_gate() -> Gate:
        return Gate(GateConfig(upstream=f"http://127.0.0.1:{up_port}", hub_host="127.0.0.1",
                               user_domain="localhost", public_port=gate_port),
                    WorkspaceSettings(browser_budget_bytes=BUDGET, upload_max_bytes=UPLOAD_MAX,
                                      runtime_dir=tmp / "runtime"),
                    db, stop_server)

    gate = new_gate()
    front = HTTPServer(make_app(gate))
    front.listen(gate_port, "127.0.0.1")
    try:
        await body(f"http://127.0.0.1:{up_port}", gate_port, gate, stopped)
        # a new gate (restart) reads the pause back from the audit log
        front.stop()
        await asyncio.sleep(0.2)
        front = HTTPServer(make_app(new_gate()))
        front.listen(gate_port, "127.0.0.1")
        host = workspace_host("alice", SERVER, "localhost")
        async with httpx.AsyncClient() as c:
            again = await c.get(f"http://127.0.0.1:{gate_port}{PREFIX}/big?size=10",
                                headers={"Host": f"{host}:{gate_port}"})
        assert again.status_code == 403 and "paused" in again.text
    finally:
        front.stop()
        upstream.stop()
    return db


def test_gate_against_a_hostile_server(tmp_path: Path) -> None:
    async def body(direct: str, gate_port: int, gate: Gate, stopped: list[str]) -> None:
        host = workspace_host("alice", SERVER, "localhost")
        own = f"http://{host}:{gate_port}"
        h = {"Host": f"{host}:{gate_port}"}
        via = f"http://127.0.0.1:{gate_port}{PREFIX}"
        async with httpx.AsyncClient(timeout=30) as c:
            # control: the upstream answers CORS for anyone and tosses a parent-domain cookie
            raw = await c.get(f"{direct}{PREFIX}/big?size=100")
            assert raw.headers["access-control-allow-origin"] == "*"
            assert "Domain=localhost" in raw.headers["set-cookie"]
            r = await c.get(f"{via}/big?size=100", headers=h)
            assert r.status_code == 200 and len(r.content) == 100
            assert "access-control-allow-origin" not in r.headers
            assert "domain=" not in r.headers["set-cookie"].lower()
            assert r.headers["cross-origin-resource-policy"] == "same-origin"
            # other origins: refused by the gate, not by the (willing) upstream
            for origin in ("http://127.0.0.1:1", f"http://x--alice.localhost:{gate_port}"):
                r = await c.get(f"{via}/big", headers={**h, "Origin": origin})
                assert r.status_code == 403
            assert (await c.request("OPTIONS", f"{via}/big", headers=h)).status_code == 403
            assert (await c.get(f"{via}/big", headers={**h, "Origin": own})).status_code == 200
            # JupyterLab's own files come from the runtime, uncounted, never from the server
            used = gate.budget.get(f"alice/{SERVER}").used
            lab = await c.get(f"{via}/static/lab/app.js?v=1", headers=h)
            assert lab.status_code == 200 and lab.content == b"trusted lab code"
            assert gate.budget.get(f"alice/{SERVER}").used == used
            for sneaky in ("/static/lab/../../etc/passwd", "/static/lab/%2e%2e/x",
                           "/static/lab/missing.js"):
                r = await c.get(f"{via}{sneaky}", headers=h)
                assert r.status_code in (403, 404) and b"root:" not in r.content, sneaky
            # chunked upload: every chunk under the limit, the sum over it
            chunk = {"type": "file", "format": "base64", "content": "A" * 20_000}
            codes = []
            for n in (1, 2, 3, -1):
                r = await c.put(f"{via}/api/contents/up.bin", headers=h,
                                json={**chunk, "chunk": n})
                codes.append(r.status_code)
            assert codes[:2] == [201, 201] and 413 in codes[2:], codes
            for n in (1, 2, 3, -1):  # control: the upstream takes them all
                r = await c.put(f"{direct}{PREFIX}/api/contents/up.bin",
                                json={**chunk, "chunk": n})
                assert r.status_code == 201
        # a message into the workspace over the upload limit closes the socket; a small one
        # passes (the upstream echoes it)
        req = httpclient.HTTPRequest(f"ws://127.0.0.1:{gate_port}{PREFIX}/api/kernels/e/channels",
                                     headers={"Host": f"{host}:{gate_port}", "Origin": own})
        paste = await websocket.websocket_connect(req)
        await paste.write_message("small")
        assert await paste.read_message() == "small"
        await paste.write_message("z" * (UPLOAD_MAX + 1))
        while await paste.read_message() is not None:
            pass
        assert paste.close_code == 1009, paste.close_code
        # websocket: the upstream pushes 3x the budget; through the gate it is cut
        req = httpclient.HTTPRequest(f"ws://127.0.0.1:{gate_port}{PREFIX}/api/kernels/k/channels",
                                     headers={"Host": f"{host}:{gate_port}", "Origin": own})
        conn = await websocket.websocket_connect(req)
        got = 0
        while (msg := await conn.read_message()) is not None:
            got += len(msg)
        assert got <= BUDGET, got
        direct_ws = await websocket.websocket_connect(
            f"ws://{direct.split('://')[1]}{PREFIX}/api/kernels/k/channels")
        total = 0
        while (msg := await direct_ws.read_message()) is not None:
            total += len(msg)
            if total >= 3 * BUDGET:
                break
        assert total >= 3 * BUDGET  # control
        direct_ws.close()
        for _ in range(50):
            if stopped:
                break
            await asyncio.sleep(0.1)
        assert stopped == [f"alice/{SERVER}"]
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.get(f"{via}/big?size=10", headers=h)
            assert r.status_code == 403 and "paused" in r.text
        await asyncio.sleep(0.3)  # background audits

    db = asyncio.run(_with_gate(tmp_path, body))
    with db.read() as s:
        entries = [(e.action, e.outcome) for e in s.execute(select(AuditEntry)).scalars()]
    db.dispose()
    assert ("workspace.browser_budget_exceeded", "refused") in entries
    assert ("workspace.pause", "success") in entries
    assert ("workspace.browser_upload", "refused") in entries
    assert ("workspace.browser_upload", "success") in entries
    assert entries.count(("workspace.browser_blocked", "refused")) >= 4


@pytest.mark.parametrize("host", ["evil.example.org", "localhost", "x.y.localhost"])
def test_unknown_hosts_are_refused(tmp_path: Path, host: str) -> None:
    async def body(direct: str, gate_port: int, gate: Gate, stopped: list[str]) -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            for _ in range(3):
                r = await c.get(f"http://127.0.0.1:{gate_port}{PREFIX}/big",
                                headers={"Host": f"{host}:{gate_port}"})
                assert r.status_code == 404
            await asyncio.sleep(0.2)
            assert gate.db is not None
            with gate.db.read() as session:
                refusals = list(session.execute(select(AuditEntry).where(
                    AuditEntry.action == "workspace.browser_blocked")).scalars())
            assert len(refusals) == 1 and refusals[0].outcome == "refused"  # not 3: no flood
            # pause the workspace so the restart check of _with_gate holds
            gate.budget.get(f"alice/{SERVER}").paused = True
            await gate.exceeded((await gate.workspace("alice", SERVER)),
                                gate.budget.get(f"alice/{SERVER}"))

    asyncio.run(_with_gate(tmp_path, body)).dispose()
