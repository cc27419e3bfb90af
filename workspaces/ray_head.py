"""A private Ray head inside one workspace's sandbox.

Never share a Ray cluster across workspaces: tasks would run as the cluster's user, outside
the sandbox. Each workspace gets its own head, started inside its sandbox (same account, same
cgroup, same network namespace, same ``/tmp``), with:

* exactly the CPUs of the permit's quota and the GPUs allocated to the workspace
  (``--num-gpus``; ``CUDA_VISIBLE_DEVICES`` lists the physical indices; on machines without
  GPUs these are Ray's logical GPUs and nothing more);
* ``object_store_memory`` set explicitly (a fraction of the memory quota), because Ray would
  otherwise size it from the host's memory, which the sandbox's cgroup does not grant;
* token authentication on (``RAY_AUTH_MODE=token``; the token is a random value written to
  ``~/.ray/auth_token`` in the workspace home, mode 0600, where Ray's clients look for it);
* no dashboard and no usage statistics; it listens on the sandbox's loopback only.

:func:`ensure_head` is called from *inside* the sandbox (by ``spe.client`` in a kernel): Ray
drivers find their raylet by listing processes, so the head must live in the same PID namespace
as the kernel, i.e. be started from the Jupyter server's process tree, never from the host. It
starts ``ray start --head --block`` detached (it outlives the kernel, not the server) and waits
for "Ray runtime started."; the spawner provides the ``SPE_RAY_*`` variables
(:func:`ray_env`) and the token (:func:`write_token`) at spawn.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from permits.terms import ComputeQuota

GCS_PORT = 6379
MIN_OBJECT_STORE = 80 * 1024 * 1024
READY = "Ray runtime started."


def object_store_bytes(quota: ComputeQuota) -> int:
    """A quarter of the memory quota, at least what Ray accepts."""
    return max(MIN_OBJECT_STORE, quota.memory_mb * 1024 * 1024 // 4)


def ray_env(quota: ComputeQuota, gpus: tuple[int, ...]) -> dict[str, str]:
    """Environment every process of the workspace gets, so Ray clients find the head."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}",
        "SPE_RAY_NUM_CPUS": str(max(1, int(quota.cpus))),
        "SPE_RAY_NUM_GPUS": str(len(gpus)),
        "SPE_RAY_OBJECT_STORE_BYTES": str(object_store_bytes(quota)),
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
    }


def head_command(ray_bin: str, env: dict[str, str]) -> list[str]:
    return [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={GCS_PORT}", f"--num-cpus={env['SPE_RAY_NUM_CPUS']}",
            f"--num-gpus={env['SPE_RAY_NUM_GPUS']}",
            f"--object-store-memory={env['SPE_RAY_OBJECT_STORE_BYTES']}",
            "--include-dashboard=false", "--disable-usage-stats"]


def write_token(home: Path, uid: int, gid: int) -> None:
    """Write a fresh Ray auth token into the workspace home (0600, owned by the workspace).

    Root runs this at spawn in a home the workspace owns, so nothing in it is trusted: no
    symbolic link is followed (``.ray`` and ``auth_token`` are replaced when they are not a
    plain directory and a fresh file), everything is done through file descriptors.
    """
    home_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(".ray", dir_fd=home_fd).st_mode):
                os.unlink(".ray", dir_fd=home_fd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(".ray", 0o700, dir_fd=home_fd)
        ray_fd = os.open(".ray", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=home_fd)
    finally:
        os.close(home_fd)
    try:
        os.fchown(ray_fd, uid, gid)
        os.fchmod(ray_fd, 0o700)
        try:
            os.unlink("auth_token", dir_fd=ray_fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree("auth_token", dir_fd=ray_fd)
        fd = os.open("auth_token", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o600, dir_fd=ray_fd)
    finally:
        os.close(ray_fd)
    with os.fdopen(fd, "w") as fh:
        os.fchown(fh.fileno(), uid, gid)
        os.fchmod(fh.fileno(), 0o600)
        fh.write(secrets.token_hex(32))


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """Poll the head's log file until it reports ready (the head outlives our pipes)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if READY in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("Ray head did not start:\n" + "\n".join(text.splitlines()[-30:]))


def ensure_head(timeout: float = 120.0) -> str:
    """Inside a sandbox: start the workspace's head unless one answers; return its address."""
    address = os.environ.get("RAY_ADDRESS", f"127.0.0.1:{GCS_PORT}")
    host, _, port = address.partition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return address
    home = Path.home()
    if not (home / ".ray" / "auth_token").exists():
        write_token(home, os.getuid(), os.getgid())
    env = dict(os.environ)
    env.setdefault("SPE_RAY_NUM_CPUS", "1")
    env.setdefault("SPE_RAY_NUM_GPUS", "0")
    env.setdefault("SPE_RAY_OBJECT_STORE_BYTES", str(MIN_OBJECT_STORE))
    env["RAY_AUTH_MODE"] = "token"
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = Path(env.get("TMPDIR", "/tmp")) / "spe-ray-head.log"  # noqa: S108 - sandbox /tmp
    with open(log, "wb") as out:
        proc = subprocess.Popen(head_command(ray_bin, env), env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _wait_ready(proc, log, timeout)
    return address
