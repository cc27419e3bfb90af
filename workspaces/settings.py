"""Settings of the workspace enclave (``SPE_WS_`` environment prefix).

Kept apart from :mod:`spe.config` so the enclave's knobs live with the code that enforces
them. Every option says how it is enforced.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkspaceSettings(BaseSettings):
    """Options of the workspace sandboxes, the GPU allocator and the hub."""

    model_config = SettingsConfigDict(env_prefix="SPE_WS_", extra="forbid", frozen=True)

    runtime_dir: Path = Field(
        Path("var/runtime"),
        description="Python runtime (a venv built from the system Python) bind-mounted "
        "read-only into every sandbox at the same path. Enforced: read-only bind; it must be "
        "world-readable and must not live under a home directory.",
    )
    subnet_pool: str = Field(
        "10.237.0.0/16",
        description="Private IPv4 pool carved into one /30 per workspace veth pair. Enforced: "
        "allocation refuses a pool that overlaps a route already on the host.",
    )
    cgroup_parent: str = Field(
        "spe-workspaces",
        description="Name of the cgroup (created under the SPE's own cgroup) that holds one "
        "child cgroup per workspace. Enforced by the kernel (memory, cpu and pids limits).",
    )
    pids_max: int = Field(
        512, ge=16, description="Most processes/threads one workspace may run (pids cgroup)."
    )
    workspaces_memory_mb: int | None = Field(
        None,
        ge=64,
        description="Memory of all workspaces together (the parent cgroup's hard limit, no "
        "swap), so the hub, API and database keep running when every workspace is full. "
        "None: 75 % of the host's memory. Enforced by the kernel (OOM kill inside the "
        "workspaces).",
    )
    workspaces_pids_max: int = Field(
        8192, ge=16, description="Processes/threads of all workspaces together (parent pids "
        "cgroup). Enforced by the kernel: fork fails with EAGAIN past it.",
    )
    workspaces_io_mbps: int | None = Field(
        None,
        ge=1,
        description="Read and write bandwidth (MB/s each) of all workspaces together on the "
        "disk holding the SPE data dir (parent cgroup). None: no limit. Enforced by the "
        "kernel for the I/O charged to the cgroup (all of it on cgroup v2, direct I/O on v1).",
    )
    allowed_host_ports: tuple[int, ...] = Field(
        (8081, 8600),
        description="Host loopback TCP ports a sandbox may reach through its veth (the hub "
        "API and the SPE API). Enforced by nftables on the host side: everything else "
        "arriving from a workspace is dropped, and nothing is forwarded.",
    )
    max_connections: int | None = Field(
        256,
        ge=1,
        description="Connections one workspace may hold open to the host at once (the hub "
        "API and the SPE API together). Enforced by nftables (ct count) on the host side; "
        "None: no limit.",
    )
    disk_quota: bool = Field(
        True,
        description="Give every workspace home its own ext4 filesystem of the permit's "
        "ComputeQuota.disk_mb (an image file mounted through a loop device, nosuid,nodev). "
        "Enforced by the kernel: writes past it fail with ENOSPC. Turn off only where loop "
        "devices are unavailable; the home then has no size limit.",
    )
    disk_key_file: Path | None = Field(
        None,
        description="Master key file (32+ random bytes, mode 0600, outside the data "
        "directory) of the workspace disk images' encryption at rest. Set: each image's home "
        "and /tmp are encrypted with ext4's fscrypt under a key derived per workspace "
        "(workspaces.fscrypt); a file others may access is refused at spawn. Unset: images "
        "are plain (`spe doctor` names it).",
    )
    gpu_indices: tuple[int, ...] = Field(
        (),
        description="Physical GPU indices the allocator hands out. Empty: detected from "
        "/dev/nvidia[0-9]* (none on machines without GPUs).",
    )
    gpu_share_limit: int = Field(
        1,
        ge=1,
        description="How many workspaces may hold the same GPU at once. 1 (default) means no "
        "sharing; anything higher is an explicit operator opt-in. Enforced in the allocator's "
        "write transaction.",
    )

    cull_idle_seconds: int = Field(
        3600,
        ge=60,
        description="A server without activity for this long is stopped by the hub service, "
        "unless its workspace is doing CPU work (cull_busy_cpu_percent; then the cull is "
        "refused and audited).",
    )
    cull_busy_cpu_percent: float = Field(
        5.0,
        gt=0,
        description="An idle server is not culled while its workspace used at least this "
        "much of one core since the previous cull round, measured from the workspace "
        "cgroup's CPU accounting (not process names). Enforced by the hub service.",
    )
    max_server_lifetime_seconds: int | None = Field(
        7 * 24 * 3600,
        ge=60,
        description="A server older than this is stopped by the hub service whatever it is "
        "doing (audited as workspace.cull, 'maximum lifetime'); the researcher starts it "
        "again. None: no maximum.",
    )
    person_check_seconds: float = Field(
        5.0,
        gt=0,
        le=8,
        description="How often the hub service checks in Keycloak that each person with a "
        "server is still enabled and a researcher; one who is not loses every server and "
        "workspace token (within this plus the stop time: under 10 s by default).",
    )
    cull_every_seconds: int = Field(
        60, ge=1, description="How often the hub service looks for idle servers."
    )
    browser_budget_bytes: int = Field(
        200 * 1024 * 1024,
        ge=1,
        description="Bytes one workspace may send to browsers per UTC day (response bodies and "
        "websocket messages: pages, notebooks, outputs). Generous for working, far below an "
        "extract. Enforced outside the sandbox by workspaces.browser_gate: the response that "
        "crosses it is cut, the server is paused (stopped) and an alert is audited; the "
        "workspace's browser traffic stays refused for the rest of the day.",
    )
    upload_max_bytes: int = Field(
        50 * 1024 * 1024,
        ge=1024,
        description="Largest upload into a workspace through the browser (one request, or the "
        "chunks of one chunked upload together). Enforced by workspaces.browser_gate: larger "
        "uploads are refused (413); every upload is audited.",
    )
    events_poll_seconds: float = Field(
        1.0,
        gt=0,
        le=5,
        description="How often the hub service polls the permit_events outbox (suspension, "
        "revocation and expiry stop the permit's servers within this plus the stop time).",
    )

    @field_validator("subnet_pool")
    @classmethod
    def _check_pool(cls, value: str) -> str:
        net = ipaddress.ip_network(value)
        if not isinstance(net, ipaddress.IPv4Network) or not net.is_private:
            raise ValueError("subnet_pool must be a private IPv4 network")
        if net.prefixlen > 28:
            raise ValueError("subnet_pool must hold several /30 networks")
        return value


@lru_cache(maxsize=1)
def get_workspace_settings() -> WorkspaceSettings:
    """The process-wide workspace settings (tests build their own)."""
    return WorkspaceSettings()
