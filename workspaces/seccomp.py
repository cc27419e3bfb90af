"""A seccomp filter for workspace sandboxes (classic BPF, handed to ``bwrap --seccomp``).

Contract:

* :func:`program` returns the filter for this machine's architecture (x86_64, aarch64), or
  ``None`` where none is known (then the sandbox runs without one).
* Refused with ``EPERM``: creating a user namespace (``unshare``/``clone`` with
  ``CLONE_NEWUSER``: inside one a workspace regains every capability over its own namespaces
  and reaches kernel code unprivileged users otherwise cannot); the kernel keyring calls
  (``add_key``, ``request_key``, ``keyctl``: keyrings are not namespaced, so a key left in a
  workspace's user keyring outlives its account and would reach the next workspace given the
  same uid, and the session keyring inherited from the spawner is possessed); every system
  call of another ABI (i386, x32, arm32), so no refusal is bypassed through a compat entry.
* ``clone3`` answers ``ENOSYS`` (its flags live in memory a filter cannot read): the C library
  then falls back to ``clone``, which the filter checks.
* Everything else is allowed: the sandbox's namespaces, account and capabilities do the rest.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWUSER = 0x10000000
X32_SYSCALL_BIT = 0x40000000

# BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

# offsets in struct seccomp_data
NR, ARCH, ARG0 = 0, 4, 16


# (audit arch, x32 bit applies, unshare, clone, clone3, (add_key, request_key, keyctl))
ARCHES: dict[str, tuple[int, bool, int, int, int, tuple[int, ...]]] = {
    "x86_64": (0xC000003E, True, 272, 56, 435, (248, 249, 250)),
    "aarch64": (0xC00000B7, False, 97, 220, 435, (217, 218, 219)),
}


def _assemble(code: list[tuple[int, int | str, int | str, int] | str]) -> bytes:
    """Encode ``(op, jt, jf, k)`` tuples; jump targets may be label strings."""
    labels: dict[str, int] = {}
    insns: list[tuple[int, int | str, int | str, int]] = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = b""
    for i, (op, jt, jf, k) in enumerate(insns):
        def rel(target: int | str, i: int = i) -> int:
            return labels[target] - i - 1 if isinstance(target, str) else target
        out += struct.pack("<HBBI", op, rel(jt), rel(jf), k)
    return out


def program(machine: str | None = None) -> bytes | None:
    """The filter for ``machine`` (default: this one), or None where the ABI is unknown."""
    spec = ARCHES.get(machine or platform.machine())
    if spec is None:
        return None
    audit_arch, x32, unshare, clone, clone3, refused = spec
    eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    code: list[tuple[int, int | str, int | str, int] | str] = [
        (LD_W_ABS, 0, 0, ARCH),
        (JEQ_K, 0, "deny", audit_arch),
        (LD_W_ABS, 0, 0, NR),
    ]
    if x32:
        code.append((JGE_K, "deny", 0, X32_SYSCALL_BIT))
    code += [
        (JEQ_K, "flags", 0, unshare),
        (JEQ_K, "flags", 0, clone),
        (JEQ_K, "nosys", 0, clone3),
        *((JEQ_K, "deny", 0, nr) for nr in refused),
        (RET_K, 0, 0, RET_ALLOW),
        "flags",
        (LD_W_ABS, 0, 0, ARG0),
        (JSET_K, "deny", 0, CLONE_NEWUSER),
        (RET_K, 0, 0, RET_ALLOW),
        "nosys",
        (RET_K, 0, 0, enosys),
        "deny",
        (RET_K, 0, 0, eperm),
    ]
    return _assemble(code)


@contextmanager
def program_fd() -> Iterator[int | None]:
    """A readable file descriptor holding the filter (for ``bwrap --seccomp``), or None."""
    prog = program()
    if prog is None:
        yield None
        return
    fd = os.memfd_create("spe-seccomp", 0)
    try:
        os.write(fd, prog)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)
