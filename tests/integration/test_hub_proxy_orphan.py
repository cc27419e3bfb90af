"""A hub killed before its own cleanup must not leave its proxy running.

JupyterHub starts configurable-http-proxy in a session of its own, so killing the hub's process
group (what ``HubProcess.stop`` does after its grace period) does not reach the proxy; ``spe up``
then left a live proxy behind after Ctrl-C whenever the hub's shutdown took longer than the
grace period. The proxy here is the real configurable-http-proxy from the project's npm
install; the hub is a stand-in (``sleep`` in its own session): a real hub cannot be made to
die exactly between its service cleanup and its proxy cleanup.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.ports import free_port
from workspaces.hub import REPO, HubProcess

PROXY = REPO / "node_modules" / ".bin" / "configurable-http-proxy"


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


@pytest.mark.skipif(not PROXY.exists() or shutil.which("node") is None,
                    reason="configurable-http-proxy not installed (scripts/setup.sh installs it)")
def test_stop_ends_the_proxy_the_hub_left(tmp_path: Path) -> None:
    proxy = subprocess.Popen(
        [str(PROXY), "--ip", "127.0.0.1", "--port", str(free_port()), "--api-ip",
         "127.0.0.1", "--api-port", str(free_port())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    hub = subprocess.Popen(["sleep", "60"], start_new_session=True)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        time.sleep(0.5)
        assert _alive(proxy)
        pid_file = tmp_path / "proxy.pid"
        pid_file.write_text(str(proxy.pid))
        HubProcess(hub, "http://127.0.0.1:9", tmp_path / "hub.log", pid_file).stop(timeout=0.5)
        assert not _alive(hub)
        deadline = time.monotonic() + 5
        while _alive(proxy) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(proxy), "the proxy outlived the hub"

        # A pid file naming another program (the pid was reused) is never acted on.
        hub2 = subprocess.Popen(["sleep", "60"], start_new_session=True)
        pid_file.write_text(str(other.pid))
        HubProcess(hub2, "http://127.0.0.1:9", tmp_path / "hub.log", pid_file).stop(timeout=0.5)
        time.sleep(0.2)
        assert _alive(other)
    finally:
        for p in (proxy, hub, other):
            if _alive(p):
                p.kill()
            p.wait(5)
