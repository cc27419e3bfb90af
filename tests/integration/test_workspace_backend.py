"""The sandbox backend seam (issue 10, item 8): the documented contract, and bubblewrap
honouring it for real (provision, start, address, host_url, stop, destroy, idempotent destroy).

Needs root, bubblewrap, nftables and iproute2 for the lifecycle test; everything created is
removed even when a test fails.
"""

from __future__ import annotations

import inspect
import os
import shutil
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces import accounts, backend
from workspaces.backend import (
    BubblewrapBackend,
    BubblewrapHandle,
    SandboxBackend,
    SandboxHandle,
    SandboxRequest,
    check_backend,
)
from workspaces.network import existing
from workspaces.settings import WorkspaceSettings

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv")),
    reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv",
)
METHODS = ("provision", "start", "address", "host_url", "stop", "destroy")


def test_contract_table_names_exactly_the_protocol_methods() -> None:
    doc = inspect.getdoc(backend) or ""
    in_table = [line.split()[0].strip("`") for line in doc.splitlines()
                if line.startswith("``") and line.split()[0].endswith("``")]
    protocol = [name for name, _ in inspect.getmembers(SandboxBackend, inspect.isfunction)
                if not name.startswith("_")]
    assert sorted(in_table) == sorted(METHODS) == sorted(protocol)


def test_bubblewrap_is_a_backend_and_incomplete_backends_are_refused(tmp_path: Path) -> None:
    bw = BubblewrapBackend(WorkspaceSettings(), tmp_path)
    assert check_backend(bw) is bw and isinstance(bw, SandboxBackend)

    class NoDestroy:
        name = "half"

        def __init__(self, *args: object) -> None: ...
        def provision(self, request: SandboxRequest) -> None: ...
        def start(self, *args: object, **kw: object) -> None: ...
        def address(self, *args: object) -> None: ...
        def host_url(self, *args: object) -> None: ...
        def stop(self, *args: object) -> None: ...

    with pytest.raises(TypeError, match="destroy"):
        check_backend(NoDestroy())


def _host_listener() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nhub-api")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


@needs_root
def test_bubblewrap_lifecycle(tmp_path: Path) -> None:
    srv, port = _host_listener()
    settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(port,),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    bw = BubblewrapBackend(settings, tmp_path / "workspaces")
    handle = bw.provision(SandboxRequest(
        ws_id=f"t{uuid.uuid4().hex[:11]}", person="alice", permit_id="P-1",
        quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=64)))
    try:
        assert isinstance(handle, SandboxHandle) and isinstance(handle, BubblewrapHandle)
        assert handle.uid != 0 and handle.home_on_host.is_dir()
        # host_url: the only way out, to the allowed host port; any other port is refused.
        url = bw.host_url(handle, port)
        with pytest.raises(RuntimeError):
            bw.host_url(handle, port + 1)
        log = handle.root / "server.log"
        server = ("import socket, sys, urllib.request\n"
                  "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), "
                  "flush=True)\n"
                  "s = socket.socket(); s.bind((sys.argv[2], 8888)); s.listen(1)\n"
                  "while True:\n"
                  "    c, _ = s.accept(); c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nserver'); "
                  "c.close()\n")
        ip, srv_port = bw.address(handle, 8888)
        proc = bw.start(handle, ["/usr/bin/python3", "-c", server, url, ip],
                        env={"MARK": "1"}, log=log)
        body = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not body:
            try:  # the proxy (the host) reaches the server at address()
                body = urllib.request.urlopen(f"http://{ip}:{srv_port}/", timeout=2).read()
            except OSError:
                time.sleep(0.2)
        assert body == b"server"
        assert "hub-api" in log.read_text()
        # stop: every process gone, the workspace still provisioned and startable.
        bw.stop(handle)
        assert proc.poll() is not None
        assert accounts.lookup(handle.account.name) is not None
        again = bw.start(handle, ["/usr/bin/python3", "-c", "print('again')"], env={},
                         log=log)
        assert again.wait(20) == 0
    finally:
        bw.destroy(handle, remove_home=True)
        srv.close()
    assert accounts.lookup(handle.account.name) is None
    assert handle.network is not None and handle.network.netns not in existing()
    assert not handle.root.exists()
    bw.destroy(handle, remove_home=True)  # idempotent


@needs_root
def test_destroy_of_a_never_started_workspace_is_idempotent(tmp_path: Path) -> None:
    settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    bw = BubblewrapBackend(settings, tmp_path / "workspaces")
    handle = bw.provision(SandboxRequest(
        ws_id=f"t{uuid.uuid4().hex[:11]}", person="bob", permit_id="P-2",
        quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=64), with_network=False))
    for _ in range(3):
        bw.destroy(handle)
    assert accounts.lookup(handle.account.name) is None
    bw.destroy(handle, remove_home=True)
    assert not handle.root.exists()
