"""Per-workspace network namespace: a veth pair to the host and nothing else.

Contract:

* :func:`create` makes network namespace ``spe-<id>`` with a veth pair whose host end
  (``speh<id>``) and namespace end (``spew<id>``) share a /30 taken from the pool. The
  namespace has loopback, the veth address and a link route only: no default route, no DNS
  server, no IPv6 (disabled on both ends).
* An nftables table ``inet spe_ws_<id>`` on the host enforces, in the kernel:
  - packets from the workspace to ``<host end>:<port>`` for each allowed port are DNAT'ed to
    ``127.0.0.1:<port>`` (the hub API and the SPE API listen on loopback only;
    ``route_localnet`` is enabled on the host end alone);
  - everything else the workspace sends to the host is dropped (new connections);
  - nothing is forwarded to or from the workspace (other workspaces, other hosts, the
    Internet), whatever the host's ``ip_forward`` is.
  - at most ``max_connections`` connections of the workspace to the host at once (the
    connection that passes it is dropped);
  - the host opens new connections into the workspace only to its server port
    (:data:`SERVER_PORT`: the proxy reaching the user's server).
* The same policy is enforced a second time *inside* the namespace (table ``inet spe_egress``,
  out of the workspace's reach: it has no capabilities), so a reload or flush of the host's
  firewall does not open the workspace: output only on loopback, replies, and new TCP
  connections to ``<host end>:<allowed port>``; input only on loopback, replies, and new TCP
  connections from the host end to the server port. Everything else is dropped.
* :func:`discover` finds the workspace networks present on the host and
  :func:`missing_host_tables` those whose host table is gone (e.g. a firewall reload);
  :func:`install_host_table` puts it back. The hub service does this periodically and audits
  every re-installation as an alert.
* With no allowed ports the namespace has loopback only (no veth, no table): still one
  namespace per workspace, so all of a workspace's processes share its loopback.
* :meth:`WorkspaceNetwork.destroy` deletes the table and the namespace (which deletes the pair).
  Idempotent.

Allocation of /30s is serialised by a lock file and checked against the host's routes.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from workspaces import helpers

NETNS_DIR = Path("/run/netns")
#: The port the single-user server listens on inside its namespace (the spawner's ``port``).
SERVER_PORT = 8888
NS_TABLE = "spe_egress"


def _run(*argv: str, input_text: str | None = None) -> str:
    proc = helpers.run(*argv, input_text=input_text)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class WorkspaceNetwork:
    """The network identity of one workspace."""

    ws_id: str
    host_ip: str
    ns_ip: str
    prefixlen: int
    allowed_ports: tuple[int, ...]
    server_port: int = 8888
    max_connections: int | None = 256

    @property
    def netns(self) -> str:
        return f"spe-{self.ws_id}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def host_if(self) -> str:
        return f"speh{self.ws_id[:11]}"

    @property
    def ns_if(self) -> str:
        return f"spew{self.ws_id[:11]}"

    @property
    def table(self) -> str:
        return f"spe_ws_{self.ws_id}"

    def url(self, port: int) -> str:
        """How the workspace reaches host loopback ``port`` (only the allowed ones work)."""
        return f"http://{self.host_ip}:{port}"

    def enter_argv(self, argv: list[str]) -> list[str]:
        return [helpers.tool("nsenter"), f"--net={self.netns_path}", "--", *argv]

    def exists(self) -> bool:
        return self.netns_path.exists()

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            _run("nft", "delete", "table", "inet", self.table)
        if self.exists():
            _run("ip", "netns", "delete", self.netns)
        with contextlib.suppress(RuntimeError):  # the pair normally goes with the namespace
            _run("ip", "link", "delete", self.host_if)


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all") or "[]")
    nets = []
    for route in out:
        dst = route.get("dst")
        if not dst or dst == "default":
            continue
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


def _ruleset(net: WorkspaceNetwork) -> str:
    ports = ", ".join(str(p) for p in net.allowed_ports)
    h = net.host_if
    limit = (f'    iifname "{h}" ct state new ct count over {net.max_connections} drop\n'
             if net.max_connections else "")
    return f"""
table inet {net.table} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{h}" ip daddr {net.host_ip} tcp dport {{ {ports} }} dnat ip to 127.0.0.1
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{h}" ct state established,related accept
{limit}    iifname "{h}" ip daddr 127.0.0.1 tcp dport {{ {ports} }} ct status dnat accept
    iifname "{h}" drop
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname "{h}" ct state established,related accept
    oifname "{h}" ip daddr {net.ns_ip} tcp dport {net.server_port} ct state new accept
    oifname "{h}" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{h}" drop
    oifname "{h}" drop
  }}
}}
"""


def _ns_ruleset(net: WorkspaceNetwork) -> str:
    """The table inside the namespace (its own copy of the policy)."""
    ports = ", ".join(str(p) for p in net.allowed_ports)
    n = net.ns_if
    return f"""
table inet {NS_TABLE} {{
  chain output {{
    type filter hook output priority filter; policy drop;
    oifname "lo" accept
    ct state established,related accept
    oifname "{n}" ip daddr {net.host_ip} tcp dport {{ {ports} }} ct state new accept
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
    ct state established,related accept
    iifname "{n}" ip saddr {net.host_ip} tcp dport {net.server_port} ct state new accept
  }}
}}
"""


def install_host_table(net: WorkspaceNetwork) -> None:
    """(Re)install the workspace's host table, atomically replacing any copy."""
    with contextlib.suppress(RuntimeError):
        _run("nft", "delete", "table", "inet", net.table)
    _run("nft", "-f", "-", input_text=_ruleset(net))


def discover(allowed_ports: tuple[int, ...], *, server_port: int = SERVER_PORT,
             max_connections: int | None = 256) -> list[WorkspaceNetwork]:
    """The workspace networks with a veth pair present on the host (from their namespace
    and the host end's address)."""
    found = []
    for name in existing():
        ws_id = name.removeprefix("spe-")
        probe = WorkspaceNetwork(ws_id, "", "", 0, ())
        with contextlib.suppress(RuntimeError, ValueError, IndexError, KeyError):
            info = json.loads(_run("ip", "-j", "-4", "addr", "show", "dev", probe.host_if))
            addr = info[0]["addr_info"][0]
            host = ipaddress.IPv4Address(addr["local"])
            found.append(WorkspaceNetwork(ws_id, str(host), str(host + 1),
                                          int(addr["prefixlen"]), tuple(allowed_ports),
                                          server_port, max_connections))
    return found


def missing_host_tables(nets: list[WorkspaceNetwork]) -> list[WorkspaceNetwork]:
    """Those of ``nets`` whose host table is not loaded."""
    listed = _run("nft", "list", "tables", "inet")
    present = {line.split()[-1] for line in listed.splitlines() if line.startswith("table")}
    return [n for n in nets if n.table not in present]


def create(ws_id: str, allowed_ports: tuple[int, ...], *, pool: str = "10.237.0.0/16",
           lock_dir: Path = Path("/run"), server_port: int = SERVER_PORT,
           max_connections: int | None = 256) -> WorkspaceNetwork:
    """Create the namespace, veth pair and nftables table of workspace ``ws_id``."""
    if not allowed_ports:  # loopback only: no veth, nothing reaches the host
        net = WorkspaceNetwork(ws_id, "", "", 0, ())
        try:
            _run("ip", "netns", "add", net.netns)
            _run("ip", "-n", net.netns, "link", "set", "lo", "up")
        except BaseException:
            net.destroy()
            raise
        return net
    pool_net = ipaddress.IPv4Network(pool)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "spe-workspace-net.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = _used_networks()
        for route in used:
            if route.overlaps(pool_net) and route.prefixlen < 30:
                raise RuntimeError(f"subnet pool {pool} overlaps host route {route}")
        for subnet in pool_net.subnets(new_prefix=30):
            if not any(subnet.overlaps(u) for u in used):
                break
        else:
            raise RuntimeError(f"subnet pool {pool} exhausted")
        host_ip, ns_ip = (str(a) for a in list(subnet.hosts())[:2])
        net = WorkspaceNetwork(ws_id, host_ip, ns_ip, 30, tuple(allowed_ports), server_port,
                               max_connections)
        try:
            _setup(net)
        except BaseException:
            net.destroy()
            raise
    return net


def _setup(net: WorkspaceNetwork) -> None:
    cidr = net.prefixlen
    _run("ip", "netns", "add", net.netns)
    _run("ip", "link", "add", net.host_if, "type", "veth", "peer", "name", net.ns_if,
         "netns", net.netns)
    for conf in (f"/proc/sys/net/ipv6/conf/{net.host_if}/disable_ipv6",):
        Path(conf).write_text("1")
    Path(f"/proc/sys/net/ipv4/conf/{net.host_if}/route_localnet").write_text("1")
    # The tables must exist before the link carries traffic.
    _run("nft", "-f", "-", input_text=_ruleset(net))
    _run("ip", "netns", "exec", net.netns, helpers.tool("nft"), "-f", "-",
         input_text=_ns_ruleset(net))
    _run("ip", "addr", "add", f"{net.host_ip}/{cidr}", "dev", net.host_if)
    _run("ip", "link", "set", net.host_if, "up")
    ns = ("ip", "-n", net.netns)
    _run("ip", "netns", "exec", net.netns, "sh", "-c",
         f"echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
         f"echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
         f"echo 1 > /proc/sys/net/ipv6/conf/{net.ns_if}/disable_ipv6")
    _run(*ns, "addr", "add", f"{net.ns_ip}/{cidr}", "dev", net.ns_if)
    _run(*ns, "link", "set", net.ns_if, "up")
    _run(*ns, "link", "set", "lo", "up")


def existing() -> list[str]:
    """Names of the workspace namespaces present on the host (for cleanup and checks)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith("spe-"))
