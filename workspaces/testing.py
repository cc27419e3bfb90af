"""Helpers for the enclave's own tests: a throw-away network namespace standing in for "some
other host", with a TCP listener and a DNS responder inside.

Everything here touches only the namespace and veth pair it creates (addresses from a private
test pool checked against the host's routes) and removes them in :meth:`TestNetns.destroy`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

from workspaces.network import _run, _used_networks

TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print('ready', flush=True)
while True:
    c, _ = s.accept(); c.sendall(b'secret-host-banner'); c.close()
"""

# Answers every A query with 192.0.2.123 (TEST-NET-1, never routed).
DNS_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
while True:
    q, addr = s.recvfrom(512)
    end = q.index(b'\\0', 12) + 5
    head = q[:2] + b'\\x81\\x80' + q[4:6] + b'\\x00\\x01\\x00\\x00\\x00\\x00'
    answer = b'\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04' + bytes([192,0,2,123])
    s.sendto(head + q[12:end] + answer, addr)
"""


def dns_query(name: str) -> bytes:
    """A minimal DNS A query for ``name`` (id 0x1234, recursion desired)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"


@dataclass
class TestNetns:
    """A network namespace reachable from the host over a veth pair."""

    pool: str = "10.238.0.0/16"
    name: str = field(default_factory=lambda: f"spet-{uuid.uuid4().hex[:8]}")
    host_ip: str = ""
    ns_ip: str = ""
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    __test__ = False  # not a pytest class

    @property
    def host_if(self) -> str:
        return f"{self.name}h"

    def create(self) -> TestNetns:
        pool = ipaddress.IPv4Network(self.pool)
        used = _used_networks()
        subnet = next(s for s in pool.subnets(new_prefix=30)
                      if not any(s.overlaps(u) for u in used))
        self.host_ip, self.ns_ip = (str(a) for a in list(subnet.hosts())[:2])
        try:
            _run("ip", "netns", "add", self.name)
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name",
                 f"{self.name}n", "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run("ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev",
                 f"{self.name}n")
            _run("ip", "-n", self.name, "link", "set", f"{self.name}n", "up")
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def _start(self, script: str, port: int) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", script, self.ns_ip,
             str(port)], stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.stdout.readline().strip() == "ready":
                return
        raise RuntimeError("test server did not start")

    def start_tcp(self, port: int = 8443) -> int:
        self._start(TCP_SERVER, port)
        return port

    def start_dns(self, port: int = 53) -> int:
        self._start(DNS_SERVER, port)
        return port

    def destroy(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)
        self.procs.clear()
        with contextlib.suppress(RuntimeError):
            _run("ip", "netns", "delete", self.name)
        with contextlib.suppress(RuntimeError):
            _run("ip", "link", "delete", self.host_if)
