"""The sandbox's system call filter is an allow-list (issue 10, item 3).

Each refusal is checked twice with the same probe and the same arguments:

* inside a real workspace sandbox (bwrap + setpriv + the production filter), where the call
  must answer the filter's refusal (``EPERM``; ``EAFNOSUPPORT`` for a socket family;
  ``ENOSYS`` for a call the table does not know);
* on the host as root in a child process, once with the same filter loaded (``prctl``) and
  once without it: with it, the same refusal; without it, the kernel itself answers something
  else (success, ``EINVAL``, ``EBADF``...). So the refusal comes from the filter, not from the
  dropped capabilities, and the test fails if the filter lets the call through.

Arguments are chosen so that, without the filter, the kernel rejects the call before doing
anything (NULL pointers, bad descriptors, invalid flags): the control run changes nothing on
the host. Needs root and bubblewrap; everything created is removed even on failure.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from workspaces import seccomp
from workspaces.errors import UnsupportedArchitecture
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings
from workspaces.syscalls import ALLOWED, CHECKED, REFUSED

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv"))
    or platform.machine() not in seccomp.ARCHES,
    reason="the sandbox needs root, bubblewrap, nftables, iproute2, setpriv and a known ABI",
)

COLUMN = seccomp.ARCHES.get(platform.machine(), (0, 0, False))[1]
BAD_FD = 2**31 - 1

# Runs one raw system call and prints its result and errno. With "filter", it first loads the
# seccomp program (hex) into itself, as bwrap does for the sandbox.
PROBE = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
nr, args, prog = json.loads(sys.argv[1])
if prog:
    code = bytes.fromhex(prog)
    class FProg(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = FProg(len(code) // 8, ctypes.cast(buf, ctypes.c_char_p))
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # SECCOMP_MODE_FILTER
libc.syscall.restype = ctypes.c_long
ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
err = ctypes.get_errno() if ret < 0 else 0
if ret >= 0 and nr in ALLOCATING:
    libc.close(ret)
print(json.dumps({"ret": ret, "errno": err}))
"""


def nr(name: str) -> int:
    table = {**ALLOWED, **REFUSED, **CHECKED}
    number = table[name][COLUMN]
    assert number is not None, name
    return number


# name -> (call, arguments): each rejected by the kernel itself, harmlessly, without the filter.
REFUSALS: dict[str, tuple[str, tuple[int, ...]]] = {
    "io_uring_setup": ("io_uring_setup", (0, 0)),
    "io_uring_enter": ("io_uring_enter", (BAD_FD, 0, 0, 0, 0, 0)),
    "io_uring_register": ("io_uring_register", (BAD_FD, 0, 0, 0)),
    "perf_event_open": ("perf_event_open", (0, 0, -1, -1, 0)),
    "userfaultfd": ("userfaultfd", (0xFFFF,)),
    "bpf": ("bpf", (9999, 0, 0)),
    "kexec_load": ("kexec_load", (0, 0, 0, 0xFFFF0000)),
    "kexec_file_load": ("kexec_file_load", (BAD_FD, BAD_FD, 0, 0, 0xFFFF)),
    "open_by_handle_at": ("open_by_handle_at", (BAD_FD, 0, 0)),
    "keyctl": ("keyctl", (9999, 0, 0, 0, 0)),
    "add_key": ("add_key", (0, 0, 0, 0, 0)),
    "request_key": ("request_key", (0, 0, 0, 0)),
    "mount": ("mount", (0, 0, 0, 0, 0)),
    "umount2": ("umount2", (0, 0)),
    "open_tree": ("open_tree", (BAD_FD, 0, 0xFFFF)),
    "fsopen": ("fsopen", (0, 0)),
    "setns": ("setns", (BAD_FD, 0)),
    "pivot_root": ("pivot_root", (0, 0)),
    "chroot": ("chroot", (0,)),
    "init_module": ("init_module", (0, 0, 0)),
    "finit_module": ("finit_module", (BAD_FD, 0, 0)),
    "delete_module": ("delete_module", (0, 0)),
    "swapon": ("swapon", (0, 0)),
    "reboot": ("reboot", (0, 0, 0, 0)),
    "quotactl": ("quotactl", (0, 0, 0, 0)),
    "clock_settime": ("clock_settime", (0, 0)),
    "settimeofday": ("settimeofday", (0, 0)),
    "sethostname": ("sethostname", (0, 0xFFFFFF)),
    "syslog": ("syslog", (9999, 0, 0)),
    "fanotify_init": ("fanotify_init", (0xFFFFFFFF, 0)),
    "kcmp": ("kcmp", (0, 0, 9999, 0, 0)),
    "pidfd_getfd": ("pidfd_getfd", (BAD_FD, 0, 0)),
    "process_madvise": ("process_madvise", (BAD_FD, 0, 0, 0, 0)),
    "lookup_dcookie": ("lookup_dcookie", (0, 0, 0)),
    "move_pages": ("move_pages", (0, 0, 0, 0, 0, 0xFFFF)),
    "set_mempolicy": ("set_mempolicy", (9999, 0, 0)),
}
REFUSALS = {k: v for k, v in REFUSALS.items() if v[0] in REFUSED
            and REFUSED[v[0]][COLUMN] is not None}

# family -> name; type SOCK_STREAM/DGRAM/RAW chosen per family so the kernel accepts it.
FAMILIES = {"AF_VSOCK": (40, 1), "AF_PACKET": (17, 3), "AF_ALG": (38, 5), "AF_KEY": (15, 3),
            "AF_BLUETOOTH": (31, 3), "AF_CAN": (29, 3), "AF_TIPC": (30, 2), "AF_RDS": (21, 5),
            "AF_XDP": (44, 3), "AF_NFC": (39, 2), "AF_APPLETALK": (5, 2), "AF_X25": (9, 5)}
ALLOWED_FAMILIES = {"AF_UNIX": (1, 1), "AF_INET": (2, 1), "AF_INET6": (10, 1),
                    "AF_NETLINK": (16, 3)}
ALLOCATING = [nr("socket"), nr("socketpair")]
PROBE = PROBE.replace("ALLOCATING", repr(ALLOCATING))


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    tmp = tmp_path_factory.mktemp("syscalls")
    settings = WorkspaceSettings(runtime_dir=tmp / "no-runtime", allowed_host_ports=(),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    w = Workspace.provision(
        workspaces_dir=tmp / "var" / "workspaces", person="mallory", permit_id="P-1",
        quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=64), settings=settings,
        with_network=False, ws_id=f"t{uuid.uuid4().hex[:11]}")
    try:
        yield w
    finally:
        w.destroy(remove_home=True)


def _parse(proc: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return int(out["ret"]), int(out["errno"])


def inside(ws: Workspace, number: int, args: tuple[int, ...]) -> tuple[int, int]:
    return _parse(ws.run(["python3", "-c", PROBE, json.dumps([number, list(args), ""])]))


def on_host(number: int, args: tuple[int, ...], *, with_filter: bool) -> tuple[int, int]:
    prog = seccomp.program().hex() if with_filter else ""
    return _parse(subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([number, list(args), prog])],
        capture_output=True, text=True, timeout=30, check=False, cwd="/"))


def check_refused(ws: Workspace, number: int, args: tuple[int, ...], refusal: int) -> None:
    assert inside(ws, number, args) == (-1, refusal)
    assert on_host(number, args, with_filter=True) == (-1, refusal)
    control = on_host(number, args, with_filter=False)
    if control == (-1, refusal):
        pytest.skip(f"this kernel answers {errno.errorcode[refusal]} by itself (compiled out "
                    "or refused by its own policy): the control cannot tell the filter apart")
    assert control != (-1, refusal)


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_call(ws: Workspace, name: str) -> None:
    call, args = REFUSALS[name]
    check_refused(ws, nr(call), args, errno.EPERM)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_refused_socket_family(ws: Workspace, family: str) -> None:
    fam, kind = FAMILIES[family]
    check_refused(ws, nr("socket"), (fam, kind, 0), errno.EAFNOSUPPORT)


def test_refused_socketpair_family(ws: Workspace) -> None:
    check_refused(ws, nr("socketpair"), (40, 1, 0, 0), errno.EAFNOSUPPORT)


@pytest.mark.parametrize("family", list(ALLOWED_FAMILIES))
def test_allowed_socket_family(ws: Workspace, family: str) -> None:
    fam, kind = ALLOWED_FAMILIES[family]
    ret, err = inside(ws, nr("socket"), (fam, kind, 0))
    assert ret >= 0, errno.errorcode.get(err)


def test_personality_limited(ws: Workspace) -> None:
    # ADDR_NO_RANDOMIZE turns off address-space randomisation for the next program.
    check_refused(ws, nr("personality"), (0x0040000,), errno.EPERM)
    assert inside(ws, nr("personality"), (0xFFFFFFFF,))[0] >= 0  # the query stays allowed


def test_clone3_falls_back(ws: Workspace) -> None:
    check_refused(ws, nr("clone3"), (0, 0), errno.ENOSYS)


def test_unknown_call_answers_enosys(ws: Workspace) -> None:
    # lsm_list_modules (Linux 6.8) is in no table: unknown calls are refused, not allowed.
    check_refused(ws, 461, (0, 0, 0), errno.ENOSYS)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x32 ABI exists on x86_64 only")
def test_x32_abi_refused(ws: Workspace) -> None:
    # getpid through the x32 entry (0x40000000 | 39): no refusal is bypassed through it.
    check_refused(ws, 0x40000000 | 39, (), errno.EPERM)


def test_ordinary_work_still_runs(ws: Workspace) -> None:
    out = ws.run(["python3", "-c", "import json, sqlite3, ssl, socket, subprocess, threading; "
                  "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join(); "
                  "db = sqlite3.connect(':memory:'); "
                  "print(db.execute('select 41+1').fetchone()[0]); "
                  "print(subprocess.run(['sh', '-c', 'echo child'], capture_output=True, "
                  "text=True).stdout.strip())"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["thread", "42", "child"]


def test_unknown_architecture_starts_nothing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "sparc64")
    settings = WorkspaceSettings(runtime_dir=tmp_path / "no-runtime", allowed_host_ports=(),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    with pytest.raises(UnsupportedArchitecture, match="does not start"):
        Workspace.provision(
            workspaces_dir=tmp_path / "ws", person="mallory", permit_id="P-1",
            quota=ComputeQuota(cpus=1.0, memory_mb=256, disk_mb=64), settings=settings,
            with_network=False, ws_id=f"t{uuid.uuid4().hex[:11]}")
    assert not (tmp_path / "ws").exists()
    with pytest.raises(UnsupportedArchitecture), seccomp.program_fd():
        pass
