"""The seccomp filter of workspace sandboxes: an allow-list (classic BPF, for ``bwrap --seccomp``).

Contract:

* :func:`program` returns the filter for this machine's architecture (x86_64, aarch64). On any
  other architecture it raises :class:`~workspaces.errors.UnsupportedArchitecture`: the
  sandbox is never started without a filter (fail closed), and
  :meth:`workspaces.sandbox.Workspace.provision` checks this before creating anything.
* Allowed: exactly the calls in :data:`workspaces.syscalls.ALLOWED` (a container runtime's
  default allow-list for 64-bit ABIs, less ``io_uring_*``), and the calls in
  :data:`~workspaces.syscalls.CHECKED` whose arguments pass:

  - ``socket``/``socketpair`` only for ``AF_UNIX``, ``AF_INET``, ``AF_INET6`` and
    ``AF_NETLINK`` (:data:`SOCKET_FAMILIES`); any other family (``AF_VSOCK`` reaches a
    hypervisor whatever the network namespace says, ``AF_PACKET``, ``AF_ALG``,
    ``AF_BLUETOOTH``...) answers ``EAFNOSUPPORT``, as on a kernel without that family;
  - ``clone`` and ``unshare`` without ``CLONE_NEWUSER`` (``EPERM``: inside a user namespace a
    workspace regains every capability over its own namespaces);
  - ``personality`` only with the values a container runtime allows (:data:`PERSONALITIES`);
  - ``clone3`` answers ``ENOSYS`` (its flags live in memory a filter cannot read): the C
    library then falls back to ``clone``, which is checked.

* Refused with ``EPERM``: the calls in :data:`~workspaces.syscalls.REFUSED`: ``io_uring_*``,
  ``perf_event_open``, ``userfaultfd``, ``bpf``, ``kexec_*``, ``open_by_handle_at``, the
  kernel keyring (``add_key``, ``request_key``, ``keyctl``: keyrings are not namespaced, a key
  left by one workspace would reach the next one given the same uid), mounts, ``setns``,
  modules, clocks, ``ptrace``-like cross-process calls beyond ``ptrace`` itself, NUMA policy,
  and the rest of a container runtime's default deny list.
* Every other call number (unknown to this table, e.g. added by a newer kernel) answers
  ``ENOSYS``, so the C library falls back to an older call where it has one; a call of another
  ABI (i386, x32, arm32) answers ``EPERM``, so nothing is reached through a compat entry.

The filter is a binary search over call-number ranges (a handful of comparisons per call).
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from workspaces.errors import UnsupportedArchitecture
from workspaces.syscalls import ALLOWED, CHECKED, NEWER, REFUSED

CLONE_NEWUSER = 0x10000000
X32_SYSCALL_BIT = 0x40000000
#: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
SOCKET_FAMILIES = (1, 2, 10, 16)
#: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and the query value 0xffffffff
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
LD_W_ABS = 0x20
JA = 0x05
JEQ_K = 0x15
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

# offsets in struct seccomp_data
NR, ARCH, ARG0 = 0, 4, 16

#: machine -> (audit arch, column in the tables of workspaces.syscalls, x32 bit applies)
ARCHES: dict[str, tuple[int, int, bool]] = {
    "x86_64": (0xC000003E, 0, True),
    "aarch64": (0xC00000B7, 1, False),
}

Action = Literal["allow", "refuse", "enosys", "socket", "clone", "personality"]
_CHECKS: dict[str, Action] = {"socket": "socket", "socketpair": "socket", "clone": "clone",
                               "unshare": "clone", "clone3": "enosys",
                               "personality": "personality"}
Insn = tuple[int, int | str, int | str, int | str]


def _assemble(code: list[Insn | str]) -> bytes:
    """Encode ``(op, jt, jf, k)`` tuples; ``jt``/``jf`` (and ``k`` of ``JA``) may be labels."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = b""
    for i, (op, jt, jf, k) in enumerate(insns):
        def rel(target: int | str, i: int = i) -> int:
            return labels[target] - i - 1 if isinstance(target, str) else target
        jt_, jf_ = rel(jt), rel(jf)
        if not (0 <= jt_ <= 255 and 0 <= jf_ <= 255):
            raise AssertionError("conditional jump out of range")
        out += struct.pack("<HBBI", op, jt_, jf_, rel(k))
    return out


def actions(machine: str) -> dict[int, Action]:
    """Call number -> action on ``machine``; numbers not in the map answer ``ENOSYS``."""
    if machine not in ARCHES:
        raise UnsupportedArchitecture(
            f"The workspace sandbox has no system call filter for {machine!r} (known: "
            f"{', '.join(ARCHES)}); it does not start without one.")
    column = ARCHES[machine][1]
    out: dict[int, Action] = {}
    for table, action in ((ALLOWED, "allow"), (NEWER, "allow"), (REFUSED, "refuse")):
        for nums in table.values():
            if (nr := nums[column]) is not None:
                out[nr] = action  # type: ignore[assignment]
    for name, nums in CHECKED.items():
        if (nr := nums[column]) is not None:
            out[nr] = _CHECKS[name]
    return out


def _leaf(action: Action, n: int) -> list[Insn | str]:
    eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    ok = f"ok{n}"
    if action == "allow":
        return [(RET_K, 0, 0, RET_ALLOW)]
    if action == "refuse":
        return [(RET_K, 0, 0, eperm)]
    if action == "enosys":
        return [(RET_K, 0, 0, enosys)]
    if action == "clone":
        return [(LD_W_ABS, 0, 0, ARG0), (JSET_K, 0, 1, CLONE_NEWUSER), (RET_K, 0, 0, eperm),
                (RET_K, 0, 0, RET_ALLOW)]
    values, refusal = ((SOCKET_FAMILIES, RET_ERRNO | errno.EAFNOSUPPORT) if action == "socket"
                       else (PERSONALITIES, eperm))
    return [(LD_W_ABS, 0, 0, ARG0), *((JEQ_K, ok, 0, v) for v in values),
            (RET_K, 0, 0, refusal), ok, (RET_K, 0, 0, RET_ALLOW)]


def _tree(segments: list[tuple[int, Action]], counter: list[int]) -> list[Insn | str]:
    """Binary search over ``segments`` (``(first number, action)``, ascending; each runs to
    the next one's first number, the last to the end)."""
    counter[0] += 1
    n = counter[0]
    if len(segments) == 1:
        return _leaf(segments[0][1], n)
    mid = len(segments) // 2
    right = f"r{n}"
    return [(JGE_K, 0, 1, segments[mid][0]), (JA, 0, 0, right),
            *_tree(segments[:mid], counter), right, *_tree(segments[mid:], counter)]


def program(machine: str | None = None) -> bytes:
    """The filter for ``machine`` (default: this one); raises UnsupportedArchitecture."""
    machine = machine or platform.machine()
    table = actions(machine)
    audit_arch, _column, x32 = ARCHES[machine]
    segments: list[tuple[int, Action]] = []
    for nr in range(max(table) + 2):
        action: Action = table.get(nr, "enosys")
        if not segments or segments[-1][1] != action or action not in ("allow", "refuse",
                                                                       "enosys"):
            segments.append((nr, action))
    code: list[Insn | str] = [
        (LD_W_ABS, 0, 0, ARCH),
        (JEQ_K, 1, 0, audit_arch),
        (RET_K, 0, 0, RET_ERRNO | errno.EPERM),
        (LD_W_ABS, 0, 0, NR),
    ]
    if x32:
        code += [(JGE_K, 0, 1, X32_SYSCALL_BIT), (RET_K, 0, 0, RET_ERRNO | errno.EPERM)]
    code += _tree(segments, [0])
    return _assemble(code)


@contextmanager
def program_fd() -> Iterator[int]:
    """A readable file descriptor holding the filter (for ``bwrap --seccomp``); raises
    UnsupportedArchitecture where there is none."""
    prog = program()
    fd = os.memfd_create("spe-seccomp", 0)
    try:
        os.write(fd, prog)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)
