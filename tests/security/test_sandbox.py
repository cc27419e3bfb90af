"""Escape attempts from inside a workspace sandbox (DESIGN §9: a workspace never reads another
workspace or the raw data store, and reaches no network host).

Every attempt is made twice with the same code: once inside the sandbox, where it must fail,
and once outside (as the host process), where it must succeed, so the check is real.
Needs root, bubblewrap, nftables and iproute2; everything created (accounts, cgroups, network
namespaces, nftables tables, processes) is removed even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces import accounts
from workspaces.network import existing
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings
from workspaces.testing import TestNetns, dns_query

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv")),
    reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv",
)

PROBE = textwrap.dedent("""
    import json, os, socket, sys
    def attempt(fn):
        try:
            return {"ok": True, "value": repr(fn())[:200]}
        except BaseException as exc:
            return {"ok": False, "error": type(exc).__name__}
    def read(path):
        with open(path, "rb") as fh:
            return fh.read()
    def connect(host, port):
        s = socket.create_connection((host, port), timeout=2)
        try:
            return s.recv(64)
        finally:
            s.close()
    def udp(host, port, payload):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        try:
            s.sendto(bytes.fromhex(payload), (host, port)); return s.recv(512)
        finally:
            s.close()
    def alive(pid):
        os.kill(pid, 0); return True
    def visible(pid):
        return str(pid) in os.listdir("/proc") or (_ for _ in ()).throw(LookupError(pid))
    def hog(mb):
        blocks = [bytearray(1024 * 1024) for _ in range(mb)]
        for b in blocks: b[::4096] = b"x" * len(b[::4096])
        return len(blocks)
    op, *args = json.loads(sys.argv[1])
    fns = {"read": read, "connect": connect, "udp": udp, "alive": alive, "visible": visible,
           "hog": hog, "resolve": socket.gethostbyname}
    print(json.dumps(attempt(lambda: fns[op](*args))))
""")


def outside(op: str, *args: object) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([op, *args])],
                          capture_output=True, text=True, timeout=60, check=False)
    return json.loads(proc.stdout)


def inside(ws: Workspace, op: str, *args: object) -> dict[str, object]:
    proc = ws.run(["/usr/bin/python3", "-c", PROBE, json.dumps([op, *args])], timeout=60)
    if not proc.stdout.strip():  # killed (e.g. by the OOM killer) before it could report
        return {"ok": False, "error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout)


@pytest.fixture
def ws_settings(tmp_path: Path) -> Iterator[WorkspaceSettings]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    yield WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(port,),
                            cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def make_ws(tmp_path: Path, ws_settings: WorkspaceSettings) -> Iterator[object]:
    made: list[Workspace] = []

    def make(person: str, permit: str = "P-1", memory_mb: int = 256) -> Workspace:
        ws = Workspace.provision(
            workspaces_dir=tmp_path / "var" / "workspaces", person=person, permit_id=permit,
            quota=ComputeQuota(cpus=1.0, memory_mb=memory_mb), settings=ws_settings,
            ws_id=f"t{uuid.uuid4().hex[:11]}")
        made.append(ws)
        return ws

    yield make
    for ws in made:
        ws.destroy(remove_home=True)
        assert accounts.lookup(ws.account.name) is None
        assert ws.spec.network is None or ws.spec.network.netns not in existing()


@pytest.fixture
def testns() -> Iterator[TestNetns]:
    ns = TestNetns().create()
    try:
        yield ns
    finally:
        ns.destroy()


def test_runs_as_unprivileged_workspace_account(make_ws) -> None:
    ws = make_ws("alice")
    out = ws.run(["/usr/bin/python3", "-c", textwrap.dedent("""
        import os
        status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
        print(os.getuid(), os.getgid(), status['CapEff'].strip(), status['CapBnd'].strip(),
              status['NoNewPrivs'].strip(), os.getcwd())
    """)])
    uid, gid, cap_eff, cap_bnd, nnp, cwd = out.stdout.split()
    assert (int(uid), int(gid)) == (ws.account.uid, ws.account.gid) and int(uid) != 0
    assert int(cap_eff, 16) == 0 and int(cap_bnd, 16) == 0 and nnp == "1"
    assert cwd == f"/home/{ws.account.name}"


def test_cannot_read_raw_store_secrets_or_other_workspace(make_ws, tmp_path: Path) -> None:
    store = tmp_path / "var" / "store"
    store.mkdir(parents=True)
    (store / "omop.duckdb").write_bytes(b"row-level health data")
    hub = tmp_path / "var" / "hub"
    hub.mkdir()
    (hub / "jupyterhub_cookie_secret").write_text("cookie-secret")
    alice, bob = make_ws("alice"), make_ws("bob")
    assert bob.run(["sh", "-c", "echo bob-notes > ~/notes.txt"]).returncode == 0
    bob_notes_host = bob.spec.home / "notes.txt"
    targets = [str(store / "omop.duckdb"), str(hub / "jupyterhub_cookie_secret"),
               str(bob_notes_host), f"/home/{bob.account.name}/notes.txt",
               str(tmp_path / "var" / "workspaces" / bob.ws_id / "home.img")]  # bob's disk
    for target in targets[:3]:
        assert outside("read", target)["ok"], target
    assert inside(bob, "read", f"/home/{bob.account.name}/notes.txt")["ok"]
    for target in targets:
        assert not inside(alice, "read", target)["ok"], target


def test_cannot_write_outside_home(make_ws) -> None:
    ws = make_ws("alice")
    proc = ws.run(["sh", "-c", "touch /usr/x || touch /etc/passwd || touch /x; "
                   "touch ~/ok && echo home-writable"])
    assert "home-writable" in proc.stdout
    assert proc.stdout.count("\n") == 1 and "Read-only" in proc.stderr


def test_cannot_see_other_processes(make_ws) -> None:
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        assert outside("alive", sleeper.pid)["ok"] and outside("visible", sleeper.pid)["ok"]
        ws = make_ws("alice")
        assert not inside(ws, "alive", sleeper.pid)["ok"]
        assert not inside(ws, "visible", sleeper.pid)["ok"]
        names = ws.run(["sh", "-c", "cat /proc/[0-9]*/comm"]).stdout.split()
        assert set(names) <= {"bwrap", "sh", "cat"}  # the sandbox's own, nothing of the host
    finally:
        sleeper.kill()
        sleeper.wait()


def test_cannot_reach_other_hosts(make_ws, testns: TestNetns) -> None:
    port = testns.start_tcp()
    assert outside("connect", testns.ns_ip, port)["ok"]
    ws = make_ws("alice")
    assert not inside(ws, "connect", testns.ns_ip, port)["ok"]
    assert not inside(ws, "connect", testns.host_ip, port)["ok"]


def test_cannot_resolve_names(make_ws, testns: TestNetns) -> None:
    dns = testns.start_dns()
    query = dns_query("example.org").hex()
    assert outside("udp", testns.ns_ip, dns, query)["ok"]
    ws = make_ws("alice")
    assert not inside(ws, "udp", testns.ns_ip, dns, query)["ok"]
    assert not inside(ws, "resolve", "example.org")["ok"]
    assert "nameserver" not in ws.run(["cat", "/etc/resolv.conf"]).stdout


def test_only_allowed_host_ports(make_ws, ws_settings: WorkspaceSettings) -> None:
    allowed = ws_settings.allowed_host_ports[0]
    servers = []
    for port in (allowed, 0):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1" if port else "0.0.0.0", port))
        srv.listen(8)
        servers.append(srv)
    other = servers[1].getsockname()[1]

    def serve(srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"host-service")
            conn.close()

    for srv in servers:
        threading.Thread(target=serve, args=(srv,), daemon=True).start()
    try:
        ws = make_ws("alice")
        assert ws.network is not None
        assert outside("connect", "127.0.0.1", other)["ok"]
        assert inside(ws, "connect", ws.network.host_ip, allowed)["ok"]  # the hub/API path
        assert not inside(ws, "connect", ws.network.host_ip, other)["ok"]
        assert not inside(ws, "connect", "127.0.0.1", allowed)["ok"]  # its own loopback
    finally:
        for srv in servers:
            srv.close()


def test_cannot_reach_another_workspace(make_ws) -> None:
    alice, bob = make_ws("alice"), make_ws("bob")
    assert alice.network is not None and bob.network is not None
    server = bob.popen(["/usr/bin/python3", "-c", textwrap.dedent("""
        import socket
        s = socket.socket(); s.bind(('0.0.0.0', 8888)); s.listen(4); print('ready', flush=True)
        while True:
            c, _ = s.accept(); c.sendall(b'bob-server'); c.close()
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert outside("connect", bob.network.ns_ip, 8888)["ok"]  # the hub's proxy path
        assert not inside(alice, "connect", bob.network.ns_ip, 8888)["ok"]
        assert not inside(alice, "connect", bob.network.host_ip, 8888)["ok"]
    finally:
        server.kill()
        server.wait()


def test_memory_limit_is_enforced(make_ws) -> None:
    assert outside("hog", 400)["ok"]
    ws = make_ws("alice", memory_mb=128)
    assert ws.spec.cgroup is not None
    assert ws.spec.cgroup.memory_limit_bytes() == 128 * 1024 * 1024
    assert not inside(ws, "hog", 400)["ok"]
    assert inside(ws, "hog", 32)["ok"]


def test_destroy_kills_everything_and_is_idempotent(make_ws) -> None:
    ws = make_ws("alice")
    proc = ws.popen(["sleep", "300"])
    assert ws.spec.cgroup is not None
    ws.destroy()
    assert proc.wait(10) != 0
    assert ws.spec.cgroup.pids() == set()
    assert accounts.lookup(ws.account.name) is None
    ws.destroy()
