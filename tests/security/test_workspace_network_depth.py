"""Network defence in depth (issue 10, item 4): the workspace's policy lives in two tables,
one on the host and one inside its own namespace; a missing host table is found and
re-installed with an audited alert; inbound only from the proxy to the server port;
connection limits per workspace.

Each control is switched off in the test (a table deleted, the limit unset) to show the same
attempt then succeeds. Needs root, bubblewrap, nftables and iproute2; everything created is
removed even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from spe.config import Settings
from spe.db import Database
from workspaces import network
from workspaces.hub_service import HubService
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv")),
    reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv",
)

CONNECT = """
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held, ok = [], 0
for _ in range(n):
    try:
        s = socket.create_connection((host, port), timeout=1.5)
        s.settimeout(5)
        if s.recv(2) == b"ok":
            ok += 1
        held.append(s)
    except OSError:
        pass
print(json.dumps({"ok": ok}))
"""
SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"ok"); c.close()
"""


class Listener:
    """A host TCP listener answering b"ok" and keeping every connection open."""

    def __init__(self, host: str = "0.0.0.0") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(b"ok")
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


Make = Callable[..., Workspace]


@pytest.fixture
def make_ws(tmp_path: Path) -> Iterator[Make]:
    made: list[Workspace] = []

    def make(ports: tuple[int, ...], server_port: int = network.SERVER_PORT,
             **extra: object) -> Workspace:
        settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime",
                                     allowed_host_ports=ports, disk_quota=False,
                                     cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}",
                                     **extra)  # type: ignore[arg-type]
        ws = Workspace.provision(
            workspaces_dir=tmp_path / "ws", person=f"p{len(made)}", permit_id="P-net",
            quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=64), settings=settings,
            ws_id=f"t{uuid.uuid4().hex[:11]}", server_port=server_port)
        made.append(ws)
        return ws

    yield make
    for ws in made:
        ws.destroy(remove_home=True)


def connections(ws: Workspace, host: str, port: int, n: int = 1) -> int:
    out = ws.run(["/usr/bin/python3", "-c", CONNECT, host, str(port), str(n)], timeout=120)
    assert out.returncode == 0, out.stderr
    return int(json.loads(out.stdout)["ok"])


def drop_host_table(net: network.WorkspaceNetwork) -> None:
    network._run("nft", "delete", "table", "inet", net.table)


def drop_ns_table(net: network.WorkspaceNetwork) -> None:
    network._run("ip", "netns", "exec", net.netns, "nft", "delete", "table", "inet",
                 network.NS_TABLE)


def test_a_flushed_host_firewall_does_not_open_the_workspace(make_ws: Make) -> None:
    allowed, other = Listener("127.0.0.1"), Listener()
    try:
        ws = make_ws((allowed.port,))
        net = ws.network
        assert net is not None
        assert connections(ws, net.host_ip, allowed.port) == 1  # the hub/API path works
        assert connections(ws, net.host_ip, other.port) == 0
        drop_host_table(net)  # a firewall reload on the host
        assert connections(ws, net.host_ip, other.port) == 0  # the namespace's table holds
        # Control: without the namespace's table either, the same attempt gets through.
        drop_ns_table(net)
        assert connections(ws, net.host_ip, other.port) == 1
    finally:
        allowed.close()
        other.close()


@pytest.mark.parametrize("server_port", [network.SERVER_PORT, 9100])
def test_inbound_only_to_the_server_port(make_ws: Make, server_port: int) -> None:
    api = Listener("127.0.0.1")
    ws = make_ws((api.port,), server_port=server_port)
    net = ws.network
    assert net is not None
    procs = [ws.popen(["/usr/bin/python3", "-c", SERVE, net.ns_ip, str(port)],
                      stdout=subprocess.PIPE, text=True)
             for port in (server_port, 9999)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

        def reach(port: int) -> bool:
            with contextlib.suppress(OSError), socket.create_connection(
                    (net.ns_ip, port), timeout=1.5) as s:
                s.settimeout(1.5)
                return s.recv(2) == b"ok"
            return False

        assert reach(server_port)  # the proxy reaches the server
        assert not reach(9999)  # nothing else in the workspace is reachable
        drop_host_table(net)
        assert not reach(9999)  # the namespace's own table refuses it too
        drop_ns_table(net)  # control: with both tables gone, it is reachable
        assert reach(9999)
    finally:
        api.close()
        for proc in procs:
            proc.kill()
            proc.wait(5)


def test_connection_limit_per_workspace(make_ws: Make) -> None:
    api = Listener("127.0.0.1")
    try:
        limited = make_ws((api.port,), max_connections=5)
        assert limited.network is not None
        assert connections(limited, limited.network.host_ip, api.port, 12) == 5
        control = make_ws((api.port,), max_connections=None)
        assert control.network is not None
        # (a loaded machine may let one attempt time out: well above the limit is enough)
        assert connections(control, control.network.host_ip, api.port, 12) >= 10
    finally:
        api.close()


def test_hub_service_reinstalls_a_missing_host_table_with_an_alert(
        make_ws: Make, db: Database, settings: Settings) -> None:
    from sqlalchemy import select

    from spe.audit.models import AuditEntry

    api = Listener("127.0.0.1")
    other = Listener()
    try:
        ws = make_ws((api.port,))
        net = ws.network
        assert net is not None
        service = HubService(settings, WorkspaceSettings(allowed_host_ports=(api.port,)), db,
                             "http://127.0.0.1:9/hub/api", "unused")
        assert ws.ws_id not in service.check_network_once()  # present: nothing to do
        drop_host_table(net)
        drop_ns_table(net)  # both gone: the workspace is open until the check
        assert connections(ws, net.host_ip, other.port) == 1
        assert ws.ws_id in service.check_network_once()
        deadline = time.monotonic() + 5
        while connections(ws, net.host_ip, other.port) != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert connections(ws, net.host_ip, api.port) == 1  # the allowed path still works
        with db.read() as s:
            alerts = list(s.execute(select(AuditEntry).where(
                AuditEntry.action == "workspace.network_reinstall")).scalars())
        assert [(a.target, a.outcome) for a in alerts] == [(ws.ws_id, "failure")]
    finally:
        api.close()
        other.close()
