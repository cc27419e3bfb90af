"""Run commands inside a workspace sandbox.

A sandboxed command runs, in this order of wrapping (outermost first):

1. ``sh`` that moves itself into the workspace's cgroup (:mod:`workspaces.cgroups`), then
2. ``nsenter`` into the workspace's network namespace (:mod:`workspaces.network`), or bwrap's
   own empty network namespace when the workspace has no network, then
3. ``bwrap`` (running as root, no user namespace) that builds a new mount, PID, IPC and UTS
   namespace and installs a seccomp filter (:mod:`workspaces.seccomp`: no user namespaces
   inside), then
4. ``setpriv`` that drops to the workspace account (``--reuid --regid --init-groups``), clears
   every capability (inheritable, ambient, bounding set) and sets ``no_new_privs``, then
5. the command.

What the command sees (and nothing else):

=====================  ==========================================================
``/usr`` (+ ``/bin``,   the system image, read-only
``/lib``...)
``/etc``                a generated minimal one: passwd/group with only root and the
                        workspace account, ``hosts`` with localhost, an empty ``resolv.conf``
runtime dir             the Python runtime (venv from the system Python), read-only, same path
``/home/<account>``     the workspace home, the only writable persistent directory: its own
                        ext4 filesystem of the permit's ``disk_mb`` (:mod:`workspaces.disk`)
``/data/extract``       the permit's pseudonymised extract, read-only (pseudonymised permits
                        only)
``/tmp``                the workspace's own scratch dir (shared by every process of the
                        workspace, e.g. the kernel and its Ray head; emptied on provision;
                        on the home filesystem, so it counts against the same quota)
``/dev/shm``            private tmpfs (1777)
``/proc``               a new procfs of the sandbox's own PID namespace
``/dev``                a minimal devtmpfs plus the allocated GPU device nodes
=====================  ==========================================================

Never visible: the SPE data dir (dataset store, keys, control DB), other workspaces, hub
and SPE secrets, other processes. :class:`Workspace` composes account, home (a loop-mounted
image sized by the quota, unless ``disk_quota`` is off), cgroup and network into one object
whose :meth:`Workspace.destroy` removes them (idempotent); the home image is kept unless
``remove_home``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from permits.terms import ComputeQuota
from spe.tls import WORKSPACE_API_HOST
from workspaces import accounts, cgroups, disk, fscrypt, helpers, network, seccomp
from workspaces.accounts import Account
from workspaces.cgroups import WorkspaceCgroup
from workspaces.disk import HomeDisk
from workspaces.network import WorkspaceNetwork
from workspaces.settings import WorkspaceSettings

EXTRACT_MOUNT = "/data/extract"
LOG_MAX_BYTES = 8 * 1024 * 1024  # a sandboxed server's log on the host, at most
#: Host /etc entries bound read-only (when present): the loader's cache, Debian's alternatives,
#: the time zone, R's site configuration (Debian's R reads /etc/R at start: the R kernel) and
#: fontconfig's (matplotlib runs fc-list, which otherwise prints an error under every first plot).
HOST_ETC_BINDS = ("ld.so.cache", "alternatives", "localtime", "R", "fonts")
SYSTEM_BINDS = ("/usr",)
#: oom_score_adj of every workspace process (services run at or below 0).
WORKSPACE_OOM_SCORE_ADJ = 800
LIMITS_SH = ('ulimit -H -c 0 && ulimit -S -c 0 && echo {oom} > /proc/self/oom_score_adj '
             '&& exec "$@"')
SYMLINKS = {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64", "/sbin": "usr/sbin"}


@dataclass(frozen=True)
class SandboxSpec:
    """Everything bwrap needs to build one workspace's view of the machine."""

    account: Account
    home: Path
    etc_dir: Path
    tmp: Path | None = None
    runtime: Path | None = None
    extract: Path | None = None
    network: WorkspaceNetwork | None = None
    cgroup: WorkspaceCgroup | None = None
    devices: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def home_in_sandbox(self) -> str:
        return f"/home/{self.account.name}"


def _parents(path: PurePosixPath) -> list[str]:
    return [str(p) for p in reversed(path.parents) if str(p) != "/"]


#: Where a sandbox finds the CA certificate it trusts for the SPE API under TLS (read-only, as
#: every file of its /etc); only a certificate is ever copied there, never a key.
CA_IN_SANDBOX = "/etc/spe-ca.pem"


def write_etc(etc_dir: Path, account: Account, api_host_ip: str | None = None,
              ca_file: Path | None = None) -> None:
    """Write the sandbox's minimal /etc files (root-owned, world-readable).

    ``api_host_ip``: the host end of the workspace's veth, named
    :data:`spe.tls.WORKSPACE_API_HOST` in ``hosts``. ``ca_file``: a PEM bundle of CA
    certificates copied to ``spe-ca.pem`` (bound at :data:`CA_IN_SANDBOX`); refused (ValueError)
    when it holds anything but certificates, so a key can never be bound by mistake."""
    etc_dir.mkdir(parents=True, exist_ok=True)
    etc_dir.chmod(0o755)
    home = f"/home/{account.name}"
    files = {
        "passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                  f"{account.name}:x:{account.uid}:{account.gid}:SPE workspace:{home}:/bin/sh\n"
                  "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\n{account.name}:x:{account.gid}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1 localhost workspace\n"
                 + (f"{api_host_ip} {WORKSPACE_API_HOST}\n" if api_host_ip else ""),
        "resolv.conf": "# no name service inside a workspace\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
        "hostname": "workspace\n",
    }
    if ca_file is not None:
        files["spe-ca.pem"] = _certificates_only(ca_file)
    for name, text in files.items():
        path = etc_dir / name
        path.write_text(text)
        path.chmod(0o644)


def _certificates_only(ca_file: Path) -> str:
    """The PEM text of ``ca_file`` if it holds only certificates (at least one)."""
    text = ca_file.read_text()
    labels = re.findall(r"-----BEGIN ([A-Z0-9 ]+)-----", text)
    if not labels or set(labels) != {"CERTIFICATE"}:
        raise ValueError("the CA file for workspaces must hold certificates only")
    return text


def bwrap_argv(spec: SandboxSpec, command: Sequence[str],
               seccomp_fd: int | None = None) -> list[str]:
    """The full host command line that runs ``command`` inside the sandbox (``seccomp_fd``:
    a descriptor the command inherits holding :func:`workspaces.seccomp.program`)."""
    a: list[str] = [helpers.tool("bwrap"), "--die-with-parent", "--new-session",
                    "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                    "--hostname", "workspace"]
    if spec.network is None:
        a.append("--unshare-net")
    for path in SYSTEM_BINDS:
        a += ["--ro-bind", path, path]
    for link, target in SYMLINKS.items():
        if os.path.islink(link):
            a += ["--symlink", target, link]
    a += ["--perms", "0755", "--dir", "/etc"]
    for name in sorted(os.listdir(spec.etc_dir)):
        a += ["--ro-bind", str(spec.etc_dir / name), f"/etc/{name}"]
    for name in HOST_ETC_BINDS:
        if os.path.lexists(f"/etc/{name}"):
            a += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    a += ["--proc", "/proc", "--dev", "/dev"]
    for dev in spec.devices:
        a += ["--dev-bind", dev, dev]
    # Private mounts inside the sandbox's own mount namespace, never the host's /tmp.
    if spec.tmp is not None:
        a += ["--bind", str(spec.tmp), "/tmp"]  # noqa: S108
    else:
        a += ["--perms", "1777", "--tmpfs", "/tmp"]  # noqa: S108
    a += ["--perms", "1777", "--tmpfs", "/dev/shm"]  # noqa: S108
    a += ["--perms", "0755", "--dir", "/home", "--bind", str(spec.home), spec.home_in_sandbox]
    if spec.runtime is not None:
        runtime = PurePosixPath(spec.runtime.resolve())
        for parent in _parents(runtime):
            a += ["--perms", "0755", "--dir", parent]
        a += ["--ro-bind", str(runtime), str(runtime)]
    if spec.extract is not None:
        a += ["--perms", "0755", "--dir", "/data", "--ro-bind", str(spec.extract), EXTRACT_MOUNT]
    # The environment is passed by the caller (Workspace.popen/run use sandbox_env), never on
    # the command line, where host processes could read tokens from /proc/<pid>/cmdline.
    a += ["--chdir", spec.home_in_sandbox]
    if seccomp_fd is not None:
        a += ["--seccomp", str(seccomp_fd)]
    a += ["--", helpers.tool("setpriv"), f"--reuid={spec.account.uid}",
          f"--regid={spec.account.gid}", "--init-groups", "--inh-caps=-all",
          "--bounding-set=-all", "--no-new-privs",
          "--", *command]
    # No core dumps (a hard limit the workspace cannot raise: a dump holds the process's
    # memory, and a piped core_pattern would hand it to a host program), and the OOM killer
    # picks workspace processes before the services (hub, API, database).
    a = ["/bin/sh", "-c", LIMITS_SH.format(oom=WORKSPACE_OOM_SCORE_ADJ), "spe-limits", *a]
    if spec.network is not None:
        a = spec.network.enter_argv(a)
    if spec.cgroup is not None:
        a = spec.cgroup.enter_argv(a)
    return a


def sandbox_env(spec: SandboxSpec) -> dict[str, str]:
    path = "/usr/local/bin:/usr/bin:/bin"
    if spec.runtime is not None:
        path = f"{spec.runtime.resolve()}/bin:{path}"
    env = {
        "HOME": spec.home_in_sandbox, "USER": spec.account.name,
        "LOGNAME": spec.account.name, "SHELL": "/bin/sh", "PATH": path,
        "LANG": "C.UTF-8", "TMPDIR": "/tmp",  # noqa: S108 - the sandbox's private tmpfs
        "PYTHONNOUSERSITE": "1",
    }
    if spec.extract is not None:
        env["SPE_EXTRACT_DIR"] = EXTRACT_MOUNT
    env.update(spec.env)
    return env


def parent_limits(settings: WorkspaceSettings, workspaces_dir: Path) -> cgroups.ParentLimits:
    """The limits of the cgroup holding every workspace, from the settings."""
    memory_mb = settings.workspaces_memory_mb
    memory = (memory_mb * 1024 * 1024 if memory_mb is not None
              else cgroups.host_memory_bytes() * 3 // 4)
    io = settings.workspaces_io_mbps
    return cgroups.ParentLimits(
        memory_bytes=memory, pids_max=settings.workspaces_pids_max,
        io_bps=io * 1024 * 1024 if io else None,
        io_device=cgroups.block_device_of(workspaces_dir) if io else None)


def _drain(pipe: IO[bytes], path: Path, max_bytes: int) -> None:
    """Copy ``pipe`` to the end of ``path``; when it would pass ``max_bytes``, start it over
    (the newest output is what explains a failure)."""
    with pipe, open(path, "ab") as out:
        while chunk := os.read(pipe.fileno(), 65536):
            if out.tell() + len(chunk) > max_bytes:
                out.truncate(0)
                out.write(b"[earlier output dropped: log size limit]\n")
            out.write(chunk[-max_bytes:])
            out.flush()


@dataclass
class Workspace:
    """A provisioned workspace: account, home, cgroup and network namespace.

    States: *provisioned* (after :meth:`provision`; commands may run) and *destroyed* (after
    :meth:`destroy`; every process killed, home unmounted and its loop device freed, cgroup,
    namespace, nftables table and account removed; the home is kept unless ``remove_home``).
    """

    ws_id: str
    root: Path
    spec: SandboxSpec
    disk: HomeDisk | None = None
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    @classmethod
    def provision(cls, *, workspaces_dir: Path, person: str, permit_id: str,
                  quota: ComputeQuota, settings: WorkspaceSettings,
                  extract: Path | None = None, with_network: bool = True,
                  devices: tuple[str, ...] = (), env: Mapping[str, str] | None = None,
                  ws_id: str | None = None,
                  server_port: int = network.SERVER_PORT,
                  ca_file: Path | None = None) -> Workspace:
        """Create everything the workspace of (person, permit) needs; undo it on failure.
        ``ca_file``: CA certificates the sandbox trusts for the SPE API (see :func:`write_etc`)."""
        ws_id = ws_id or accounts.workspace_id(person, permit_id)
        seccomp.program()  # fail closed: no filter for this machine, nothing is created
        workspaces_dir.mkdir(parents=True, exist_ok=True)
        workspaces_dir.chmod(0o700)
        root = workspaces_dir / ws_id
        if settings.disk_quota:  # admission: refused before anything is created
            disk.admit(workspaces_dir, quota.disk_mb, image=root / disk.IMAGE_NAME)
        root.mkdir(exist_ok=True)
        root.chmod(0o700)
        home = root / "home"
        undo: list[Any] = []
        home_disk: HomeDisk | None = None
        try:
            account = accounts.ensure_account(ws_id, home, f"SPE workspace {ws_id}")
            undo.append(lambda: accounts.delete_account(account.name))
            if settings.disk_quota:
                undo.append(lambda: disk.detach(root))
                key = (fscrypt.workspace_key(settings.disk_key_file, ws_id)
                       if settings.disk_key_file is not None else None)
                home_disk = disk.attach(root, size_mb=quota.disk_mb, uid=account.uid,
                                        gid=account.gid, key=key)
                home, tmp = home_disk.home, home_disk.tmp
            else:
                home.mkdir(exist_ok=True)
                os.chown(home, account.uid, account.gid)
                home.chmod(0o700)
                tmp = root / "tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                os.chown(tmp, account.uid, account.gid)
                tmp.chmod(0o700)
            cg = cgroups.create(ws_id, quota, parent=settings.cgroup_parent,
                                pids_max=settings.pids_max,
                                parent_limits=parent_limits(settings, workspaces_dir))
            undo.append(cg.destroy)
            net = network.create(ws_id, settings.allowed_host_ports if with_network else (),
                                 pool=settings.subnet_pool, server_port=server_port,
                                 max_connections=settings.max_connections)
            undo.append(net.destroy)
            write_etc(root / "etc", account, api_host_ip=net.host_ip, ca_file=ca_file)
            runtime = settings.runtime_dir if settings.runtime_dir.is_dir() else None
            spec = SandboxSpec(account=account, home=home, etc_dir=root / "etc", tmp=tmp,
                               runtime=runtime, extract=extract, network=net, cgroup=cg,
                               devices=devices, env=dict(env or {}))
        except BaseException:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    step()
            raise
        return cls(ws_id=ws_id, root=root, spec=spec, disk=home_disk)

    @property
    def account(self) -> Account:
        return self.spec.account

    @property
    def network(self) -> WorkspaceNetwork | None:
        return self.spec.network

    def argv(self, command: Sequence[str], seccomp_fd: int | None = None) -> list[str]:
        return bwrap_argv(self.spec, command, seccomp_fd)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The complete environment of a sandboxed command (nothing of the host's)."""
        return {**sandbox_env(self.spec), **(extra or {})}

    def popen(self, command: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("start_new_session", True)
        with seccomp.program_fd() as fd:
            kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), fd)
            proc = subprocess.Popen(self.argv(command, fd), env=self.env(env), **kwargs)
        self._procs.append(proc)
        return proc

    def popen_logged(self, command: Sequence[str], *, log: Path,
                     env: Mapping[str, str] | None = None,
                     max_bytes: int = LOG_MAX_BYTES) -> subprocess.Popen[bytes]:
        """:meth:`popen` with stdout and stderr appended to the host file ``log``, which never
        grows past ``max_bytes``: every process of the workspace can write to the descriptors
        it inherited, and a host file is outside the workspace's disk quota."""
        proc: subprocess.Popen[bytes] = self.popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        threading.Thread(target=_drain, args=(proc.stdout, log, max_bytes), daemon=True,
                         name=f"log-{self.ws_id}").start()
        return proc

    def _kill_and_reap(self) -> None:
        if self.spec.cgroup is not None:
            self.spec.cgroup.kill_all()
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self._procs.clear()

    def run(self, command: Sequence[str], *, timeout: float = 60.0,
            input_text: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with seccomp.program_fd() as fd:
            return subprocess.run(self.argv(command, fd), capture_output=True, text=True,
                                  input=input_text, timeout=timeout, check=False,
                                  env=self.env(env), pass_fds=(fd,))

    def destroy(self, *, remove_home: bool = False) -> None:
        """Kill every process, unmount the home, remove cgroup, network and account.

        Idempotent. The home image stays (retention) unless ``remove_home``."""
        errors: list[BaseException] = []
        for step in (
            self._kill_and_reap,
            lambda: disk.detach(self.root),
            lambda: self.spec.cgroup.destroy() if self.spec.cgroup else None,
            lambda: self.spec.network.destroy() if self.spec.network else None,
            lambda: accounts.delete_account(self.account.name),
        ):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - finish cleaning, then report
                errors.append(exc)
        if remove_home:
            shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise errors[0]
