"""The port picker the test stacks use: distinct ports, outside the ephemeral range, free."""

from __future__ import annotations

import socket

from tests.ports import HIGH, LOW, free_port, free_port_pair


def _ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)  # the hub once got the proxy API's port
    assert all(LOW <= p < HIGH for p in ports)
    assert _ephemeral_low() >= HIGH
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_pair_is_adjacent_and_never_handed_out_again() -> None:
    port = free_port_pair()
    later = {free_port() for _ in range(300)}
    assert port not in later and port + 1 not in later
