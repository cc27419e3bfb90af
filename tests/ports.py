"""Free loopback ports for the services a test or benchmark starts.

``bind(port 0)`` hands out ports from the kernel's ephemeral range, the same range every outgoing
connection (to Keycloak, PostgreSQL, the API) takes its source port from, and two calls in a row
may return the same port once the first socket is closed: a hub once failed to bind because its
port had been handed to the proxy's API as well. Ports here come from below the ephemeral range,
are never handed out twice by one process, and are checked free on loopback when chosen.
"""

from __future__ import annotations

import random
import socket
import threading

LOW, HIGH = 15000, 32000  # below Linux's default ephemeral range (32768-60999)

_given: set[int] = set()
_lock = threading.Lock()
_rand = random.SystemRandom()  # a test that seeds ``random`` must not make two processes agree


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port free now and not returned before by this process."""
    with _lock:
        for _ in range(1000):
            port = _rand.randrange(LOW, HIGH)
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    raise RuntimeError(f"no free loopback port between {LOW} and {HIGH}")


def free_port_pair() -> int:
    """A free port P whose P+1 is free too (Keycloak's management interface); both reserved."""
    with _lock:
        for _ in range(1000):
            port = _rand.randrange(LOW, HIGH - 1)
            if {port, port + 1} & _given or not (_bindable(port) and _bindable(port + 1)):
                continue
            _given.update((port, port + 1))
            return port
    raise RuntimeError(f"no two free adjacent loopback ports between {LOW} and {HIGH}")
