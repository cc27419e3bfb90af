"""The sandbox backend seam: what the spawner asks of whatever isolates a workspace.

Written in the style of JupyterHub's ``Spawner`` contract. The spawner
(:class:`workspaces.spawner.SandboxSpawner`) decides *whether* a workspace may run (permit,
person, GPUs, tokens, audit); a backend decides *how* it is isolated. Bubblewrap
(:class:`BubblewrapBackend`) is the one implementation today; a cluster backend (KubeSpawner
pods) would implement the same methods.

Contract (every backend):

===============  =====================================================================
``provision``    Create everything one workspace needs (account, persistent home of the
                 quota's disk size, CPU/memory/pids limits, network namespace, the permit's
                 extract read-only, the granted devices) and return a handle. Undoes what it
                 made when it fails. Creates nothing when it refuses (e.g. no system call
                 filter for this machine: :class:`~workspaces.errors.UnsupportedArchitecture`).
``start``        Run one command (the single-user server) inside the sandbox with exactly
                 the given environment (nothing of the host's), its output appended to a
                 host log file of bounded size; returns the process (``poll()``, ``pid``).
``address``      ``(ip, port)`` at which the proxy reaches a port the server listens on
                 inside the sandbox.
``host_url``     The URL at which code inside the sandbox reaches one of the host's allowed
                 ports (the hub API, the SPE API): the only network a sandbox has.
``stop``         Kill every process of the workspace (kernels, Ray heads: all share its
                 cgroup); the workspace stays provisioned and may be started again.
``destroy``      Stop, then remove everything ``provision`` made except the home (kept for the
                 permit's retention period) unless ``remove_home``. **Idempotent**: calling
                 it again, or on a half-provisioned workspace, succeeds and removes what is
                 left.
===============  =====================================================================

States of one handle: *provisioned* -> (``start``) *running* -> (``stop``) *provisioned*;
any state -> (``destroy``) *destroyed*; ``destroy`` on *destroyed* does nothing. Network:
a sandbox reaches nothing but :meth:`host_url`'s ports (enforced by the backend, in the
kernel), and only the proxy reaches its server (:meth:`address`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from permits.terms import ComputeQuota
from workspaces.network import SERVER_PORT
from workspaces.sandbox import LOG_MAX_BYTES, Workspace
from workspaces.settings import WorkspaceSettings


@dataclass(frozen=True)
class SandboxRequest:
    """What the spawner asks a backend to provision."""

    ws_id: str
    person: str
    permit_id: str
    quota: ComputeQuota
    extract: Path | None = None
    devices: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    with_network: bool = True
    server_port: int = SERVER_PORT  # the only port the proxy may open inside the sandbox
    ca_file: Path | None = None  # CA certificates the sandbox trusts for the SPE API (TLS)


@runtime_checkable
class SandboxHandle(Protocol):
    """What the spawner reads of a provisioned sandbox."""

    ws_id: str
    root: Path  # host directory of the workspace (its server.log lives here)

    @property
    def home_on_host(self) -> Path: ...

    @property
    def home_in_sandbox(self) -> str: ...

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...

    @property
    def runtime(self) -> Path | None: ...


H = TypeVar("H", bound=SandboxHandle)


@runtime_checkable
class SandboxBackend(Protocol[H]):
    """The seam between the spawner and an isolation technology (see the module contract)."""

    name: str

    def provision(self, request: SandboxRequest) -> H: ...

    def start(self, handle: H, command: Sequence[str], *, env: Mapping[str, str],
              log: Path) -> subprocess.Popen[bytes]: ...

    def address(self, handle: H, port: int) -> tuple[str, int]: ...

    def host_url(self, handle: H, port: int) -> str: ...

    def stop(self, handle: H) -> None: ...

    def destroy(self, handle: H, *, remove_home: bool = False) -> None: ...


class BubblewrapHandle(Workspace):
    """A bubblewrap :class:`~workspaces.sandbox.Workspace` seen through :class:`SandboxHandle`."""

    @property
    def home_on_host(self) -> Path:
        return self.spec.home

    @property
    def home_in_sandbox(self) -> str:
        return self.spec.home_in_sandbox

    @property
    def uid(self) -> int:
        return self.account.uid

    @property
    def gid(self) -> int:
        return self.account.gid

    @property
    def runtime(self) -> Path | None:
        return self.spec.runtime.resolve() if self.spec.runtime is not None else None


class BubblewrapBackend:
    """Bubblewrap + setpriv + seccomp + cgroups + a network namespace per workspace
    (:mod:`workspaces.sandbox`)."""

    name = "bubblewrap"

    def __init__(self, settings: WorkspaceSettings, workspaces_dir: Path) -> None:
        self.settings = settings
        self.workspaces_dir = workspaces_dir

    def provision(self, request: SandboxRequest) -> BubblewrapHandle:
        ws = Workspace.provision(
            workspaces_dir=self.workspaces_dir, person=request.person,
            permit_id=request.permit_id, quota=request.quota, settings=self.settings,
            extract=request.extract, with_network=request.with_network,
            devices=request.devices, env=request.env, ws_id=request.ws_id,
            server_port=request.server_port, ca_file=request.ca_file)
        return BubblewrapHandle(ws_id=ws.ws_id, root=ws.root, spec=ws.spec, disk=ws.disk)

    def start(self, handle: BubblewrapHandle, command: Sequence[str], *,
              env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
        return handle.popen_logged(command, env=env, log=log, max_bytes=LOG_MAX_BYTES)

    def address(self, handle: BubblewrapHandle, port: int) -> tuple[str, int]:
        if handle.network is None:
            raise RuntimeError(f"workspace {handle.ws_id} has no network: nothing reaches it")
        return handle.network.ns_ip, port

    def host_url(self, handle: BubblewrapHandle, port: int) -> str:
        if handle.network is None or port not in handle.network.allowed_ports:
            raise RuntimeError(f"port {port} is not reachable from workspace {handle.ws_id}")
        return handle.network.url(port)

    def stop(self, handle: BubblewrapHandle) -> None:
        handle._kill_and_reap()

    def destroy(self, handle: BubblewrapHandle, *, remove_home: bool = False) -> None:
        handle.destroy(remove_home=remove_home)


def check_backend(backend: Any) -> SandboxBackend[Any]:
    """``backend`` if it has every method of the contract; else raise TypeError."""
    if not isinstance(backend, SandboxBackend):
        missing = [m for m in ("provision", "start", "address", "host_url", "stop", "destroy")
                   if not callable(getattr(backend, m, None))]
        raise TypeError(f"{type(backend).__name__} is not a SandboxBackend (missing: "
                        f"{', '.join(missing) or 'name'})")
    return backend
