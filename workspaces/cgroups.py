"""Per-workspace CPU, memory, process and device limits through cgroups, without systemd.

Contract:

* :func:`create` makes one cgroup per workspace and writes the limits of a
  :class:`~permits.terms.ComputeQuota` into it. cgroup v2 (``/sys/fs/cgroup/cgroup.controllers``
  exists) is used when mounted; otherwise the v1 ``memory``, ``cpu`` and ``pids`` hierarchies.
  On v1 the workspace cgroups nest under the SPE process's own cgroup (so the SPE's own limits
  still bound them); on v2 under the mount root (the "no internal processes" rule forbids
  nesting under a cgroup that holds processes).
* Memory: hard limit, no swap (``memory.max``/``memory.swap.max`` or ``memory.limit_in_bytes``/
  ``memory.memsw.limit_in_bytes``); exceeding it gets the process OOM-killed by the kernel.
  CPU: a CFS quota of ``cpus`` cores. Pids: ``pids_max``.
* :meth:`WorkspaceCgroup.enter_argv` prefixes a command so that it moves itself into the
  cgroup *before* exec'ing the sandbox, so nothing of the workspace ever runs outside it.
* :meth:`WorkspaceCgroup.destroy` kills every process left in the cgroup and removes it.
  Idempotent.
* The parent cgroup that holds every workspace carries limits of its own
  (:class:`ParentLimits`, written by every :func:`create`): memory (hard, no swap), pids, and
  read/write bandwidth on the device holding the workspaces' files, so the hub, the API and
  the database keep running when every workspace is at its quota. Its CPU weight is half the
  default, so services win contended CPU. (I/O throttling covers the I/O the kernel charges
  to the cgroup: all of it on v2; direct I/O only on v1.)
* :meth:`WorkspaceCgroup.allow_devices` (v1 only) denies every character device but the
  standard ones and the GPUs given. On v2, device access is limited by visibility: the sandbox's
  ``/dev`` holds only the allocated device nodes (see :mod:`workspaces.sandbox`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from permits.terms import ComputeQuota

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
#: v1 hierarchies a workspace joins when they are mounted (CPU accounting).
V1_OPTIONAL = ("cpuacct",)
CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class ParentLimits:
    """Limits of the cgroup holding all workspaces together (``None``: no limit)."""

    memory_bytes: int | None = None
    pids_max: int | None = None
    io_bps: int | None = None  # read and write bytes/s each, on ``io_device``
    io_device: tuple[int, int] | None = None  # (major, minor)


#: oom_score_adj of the SPE's own services (the hub with its spawners, the hub service).
SERVICE_OOM_SCORE_ADJ = -500


def protect_service() -> bool:
    """Make the calling service process a late choice of the OOM killer (root only; some
    kernels refuse lowering it: then False, and the services keep 0, still far below the
    workspaces' score)."""
    try:
        _write(Path("/proc/self/oom_score_adj"), str(SERVICE_OOM_SCORE_ADJ))
    except OSError:
        return False
    return True


def host_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def block_device_of(path: Path) -> tuple[int, int] | None:
    """(major, minor) of the whole disk holding ``path`` (partitions map to their disk)."""
    dev = path.stat().st_dev
    major, minor = os.major(dev), os.minor(dev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if not sys_dev.exists():
        return None  # not a block device (tmpfs, overlay...)
    parent = sys_dev.resolve().parent / "dev"
    if (sys_dev.resolve() / "partition").exists() and parent.is_file():
        major, minor = (int(x) for x in parent.read_text().split(":"))
    return major, minor


def _limit(path: Path, value: str, what: str) -> None:
    try:
        _write(path, value)
    except OSError as exc:
        raise RuntimeError(f"cannot set the workspaces' {what} limit ({path.name}={value}): "
                           f"{exc.strerror}") from exc


def _apply_parent(kind: Literal["v2", "memory", "cpu", "pids", "blkio"], top: Path,
                  limits: ParentLimits) -> None:
    mem = str(limits.memory_bytes) if limits.memory_bytes is not None else None
    if kind == "v2":
        _limit(top / "memory.max", mem or "max", "memory")
        with contextlib.suppress(FileNotFoundError):
            _write(top / "memory.swap.max", "0")
        _limit(top / "pids.max", str(limits.pids_max or "max"), "pids")
        with contextlib.suppress(OSError):
            _write(top / "cpu.weight", "50")
        if limits.io_device is not None and (top / "io.max").exists():
            rate = str(limits.io_bps) if limits.io_bps else "max"
            major, minor = limits.io_device
            _limit(top / "io.max", f"{major}:{minor} rbps={rate} wbps={rate}", "I/O")
    elif kind == "memory":
        _limit(top / "memory.limit_in_bytes", mem or "-1", "memory")
        memsw = top / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _limit(memsw, mem or "-1", "memory+swap")
    elif kind == "pids":
        _limit(top / "pids.max", str(limits.pids_max or "max"), "pids")
    elif kind == "cpu":
        with contextlib.suppress(OSError):
            _write(top / "cpu.shares", "512")
    elif kind == "blkio" and limits.io_device is not None:
        major, minor = limits.io_device
        rate = str(limits.io_bps or 0)  # 0 removes the rule
        for name in ("blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"):
            if (top / name).exists():
                _limit(top / name, f"{major}:{minor} {rate}", "I/O")


def is_v2(root: Path = ROOT) -> bool:
    return (root / "cgroup.controllers").is_file()


def _own_v1_path(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path.lstrip("/")
    return ""


def _v1_mount(controller: str, root: Path = ROOT) -> Path:
    direct = root / controller
    if (direct / "cgroup.procs").is_file():
        return direct
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = right.split()
        if fields and fields[0] == "cgroup" and controller in fields[-1].split(","):
            return Path(left.split()[4])
    raise RuntimeError(f"cgroup v1 controller {controller!r} is not mounted")


def _write(path: Path, value: str) -> None:
    path.write_text(value)


@dataclass
class WorkspaceCgroup:
    """The cgroup directories of one workspace (one on v2, one per controller on v1)."""

    name: str
    version: int
    dirs: tuple[Path, ...]
    #: cgroups shared by all workspaces that this one's processes join too (v1 blkio: its
    #: throttling is not hierarchical, so the common limit is set where they all are); never
    #: read for this workspace's processes, never removed with it.
    shared: tuple[Path, ...] = ()

    @property
    def procs_files(self) -> tuple[Path, ...]:
        return tuple(d / "cgroup.procs" for d in (*self.dirs, *self.shared))

    def enter_argv(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped so the process joins this cgroup before it execs."""
        script = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; ' \
                 'exec "$@"'
        return ["/bin/sh", "-c", script, "spe-cgroup",
                *(str(p) for p in self.procs_files), "--", *argv]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in (d / "cgroup.procs" for d in self.dirs):
            with contextlib.suppress(FileNotFoundError):
                found.update(int(x) for x in procs.read_text().split())
        return found

    def cpu_seconds(self) -> float | None:
        """CPU time used by every process the workspace ever ran (the kernel's accounting of
        the cgroup, which no process inside can forge); None where it is not available."""
        with contextlib.suppress(OSError, ValueError, KeyError):
            if self.version == 2:
                stat = dict(line.split() for line in
                            self.dirs[0].joinpath("cpu.stat").read_text().splitlines())
                return int(stat["usage_usec"]) / 1e6
            for d in self.dirs:  # cpuacct, alone or co-mounted with cpu
                if (d / "cpuacct.usage").exists():
                    return int((d / "cpuacct.usage").read_text()) / 1e9
        return None

    def memory_limit_bytes(self) -> int:
        if self.version == 2:
            return int(self.dirs[0].joinpath("memory.max").read_text())
        return int(self._dir("memory").joinpath("memory.limit_in_bytes").read_text())

    def _dir(self, controller: str) -> Path:
        for d in self.dirs:
            if controller in d.parts:
                return d
        raise KeyError(controller)

    def allow_devices(self, gpu_minors: tuple[int, ...]) -> bool:
        """Deny NVIDIA devices except ``gpu_minors`` (v1 devices cgroup). False on v2."""
        if self.version == 2:
            return False
        base = _v1_mount("devices") / _own_v1_path("devices") / self.name
        base.mkdir(exist_ok=True)
        _write(base / "devices.deny", "c 195:* rwm")
        for minor in gpu_minors:
            _write(base / "devices.allow", f"c 195:{minor} rwm")
        _write(base / "devices.allow", "c 195:255 rwm")  # nvidiactl
        self.dirs = (*self.dirs, base)
        return True

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in the cgroup until none is left."""
        deadline = time.monotonic() + timeout
        if self.version == 2:
            kill = self.dirs[0] / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    _write(kill, "1")
        while True:
            left = self.pids()
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {sorted(left)} survive in cgroup {self.name}")
            time.sleep(0.05)

    def destroy(self, timeout: float = 10.0) -> None:
        """Kill everything in the cgroup, then remove it (no-op when already gone).

        A killed process stays charged to the cgroup until its parent reaps it: callers that
        started processes reap them between :meth:`kill_all` and this call.
        """
        self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while d.exists():
                try:
                    d.rmdir()
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        break
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            with contextlib.suppress(OSError):  # the shared parent, once its last child goes
                d.parent.rmdir()
        for d in self.shared:  # once no workspace is left in it
            with contextlib.suppress(OSError):
                d.rmdir()


def create(name: str, quota: ComputeQuota, *, parent: str = "spe-workspaces",
           pids_max: int = 512, root: Path = ROOT,
           parent_limits: ParentLimits | None = None) -> WorkspaceCgroup:
    """Create (or reuse) the cgroup ``parent/name`` with the limits of ``quota``, and write
    ``parent_limits`` (default: none) into ``parent``."""
    limits = parent_limits or ParentLimits()
    memory = quota.memory_mb * 1024 * 1024
    cpu_quota = max(1000, int(quota.cpus * CFS_PERIOD_US))
    if is_v2(root):
        top = root / parent
        top.mkdir(exist_ok=True)
        for node in (root, top):
            with contextlib.suppress(OSError):
                _write(node / "cgroup.subtree_control", "+memory +cpu +pids")
            with contextlib.suppress(OSError):
                _write(node / "cgroup.subtree_control", "+io")
        _apply_parent("v2", top, limits)
        d = top / name
        d.mkdir(exist_ok=True)
        _write(d / "memory.max", str(memory))
        with contextlib.suppress(FileNotFoundError):
            _write(d / "memory.swap.max", "0")
        _write(d / "cpu.max", f"{cpu_quota} {CFS_PERIOD_US}")
        _write(d / "pids.max", str(pids_max))
        return WorkspaceCgroup(name=name, version=2, dirs=(d,))
    dirs = []
    for controller in V1_CONTROLLERS:
        top = _v1_mount(controller, root) / _own_v1_path(controller) / parent
        top.mkdir(parents=True, exist_ok=True)
        _apply_parent(controller, top, limits)  # type: ignore[arg-type]
        d = top / name
        d.mkdir(exist_ok=True)
        dirs.append(d)
        if controller == "memory":
            _write(d / "memory.limit_in_bytes", str(memory))
            memsw = d / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                _write(memsw, str(memory))
        elif controller == "cpu":
            _write(d / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(cpu_quota))
        elif controller == "pids":
            _write(d / "pids.max", str(pids_max))
    with contextlib.suppress(RuntimeError):  # no cpuacct hierarchy: no CPU accounting
        mount = _v1_mount("cpuacct", root)
        if mount.resolve() != _v1_mount("cpu", root).resolve():  # not co-mounted with cpu
            top = mount / _own_v1_path("cpuacct") / parent
            top.mkdir(parents=True, exist_ok=True)
            (top / name).mkdir(exist_ok=True)
            dirs.append(top / name)
    shared: list[Path] = []
    if limits.io_device is not None:
        with contextlib.suppress(RuntimeError):  # no blkio hierarchy: nothing to throttle
            top = _v1_mount("blkio", root) / _own_v1_path("blkio") / parent
            top.mkdir(parents=True, exist_ok=True)
            _apply_parent("blkio", top, limits)
            shared.append(top)  # v1 throttling is flat: all workspaces share this one
    return WorkspaceCgroup(name=name, version=1, dirs=tuple(dirs), shared=tuple(shared))
