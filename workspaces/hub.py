"""Start and stop the SPE's JupyterHub (``spe up``, the hub tests and the benchmark use this).

:func:`start_hub` runs ``jupyterhub -f infra/jupyterhub/jupyterhub_config.py`` (or another
config) as a child process in its own session, with the SPE settings in its environment, and
waits until the hub answers through the proxy. Readiness is probed by the body of
``/hub/api/`` (the proxy answers 404 there until the hub registered its routes), and a hub that
exits early raises with the tail of its log. :meth:`HubProcess.stop` terminates it (the hub
stops its servers and the proxy), then kills what is left of its process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "infra" / "jupyterhub" / "jupyterhub_config.py"


def user_subdomain(name: str, domain: str, kind: str, *, user_domain: str) -> str:
    """JupyterHub ``subdomain_hook``: users' (and services') domains under ``user_domain``
    instead of under the hub's own host, so no workspace shares a site with the hub.
    The browser gate then gives each named server its own host below it."""
    from jupyterhub.utils import subdomain_hook_idna

    return str(subdomain_hook_idna(name, user_domain, kind))


@dataclass
class HubProcess:
    proc: subprocess.Popen[bytes]
    public_url: str
    log_path: Path
    #: the proxy's pid file (``ConfigurableHTTPProxy.pid_file``): JupyterHub starts the proxy
    #: in a session of its own, so a hub killed before its cleanup leaves it running
    proxy_pid_file: Path | None = None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._stop_orphaned_proxy()

    def _stop_orphaned_proxy(self) -> None:
        """Terminate the proxy named in ``proxy_pid_file`` if it still runs (the hub had no
        time to stop it); only a configurable-http-proxy process is ever signalled."""
        if self.proxy_pid_file is None:
            return
        try:
            pid = int(self.proxy_pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return  # no pid file, or the proxy is gone
        if b"configurable-http-proxy" not in cmdline:
            return  # the pid was reused by another program
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() \
                    and not _zombie(pid):
                time.sleep(0.05)
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None,
               timeout: float = 60.0) -> None:
    """Until ``url``/hub/api/ answers the hub's version JSON (not the proxy's 404)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"hub exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            resp = httpx.get(f"{url}/hub/api/", timeout=2)
            if resp.status_code == 200 and "version" in resp.json():
                return
        time.sleep(0.25)
    raise TimeoutError(f"hub at {url} not ready after {timeout:.0f} s")


def _data_dir(env: Mapping[str, str]) -> Path:
    """The data directory the hub's config will use with ``env`` (it runs in the repository)."""
    configured = env.get("SPE_DATA_DIR")
    if configured:
        path = Path(configured)
    else:
        from spe.config import Settings

        path = Settings.model_fields["data_dir"].default
    return (path if path.is_absolute() else REPO / path).resolve()


def start_hub(*, public_url: str, env: Mapping[str, str], log_path: Path,
              config: Path = CONFIG, timeout: float = 60.0,
              proxy_pid_file: Path | None = None) -> HubProcess:
    """Start the hub with ``env`` added to this process's environment; wait until ready.
    ``proxy_pid_file``: where the config has the proxy write its pid (stopped with the hub);
    with the SPE's own config it defaults to where that config puts it (``<data dir>/hub``)."""
    full_env = {**os.environ, **env}
    if proxy_pid_file is None and config == CONFIG:
        proxy_pid_file = _data_dir(full_env) / "hub" / "proxy.pid"
    full_env["SPE_HUB_PUBLIC_URL"] = public_url
    full_env.setdefault("PYTHONPATH", str(REPO))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(bindir / "jupyterhub"), "-f", str(config)], cwd=str(REPO), env=full_env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    hub = HubProcess(proc, public_url.rstrip("/"), log_path, proxy_pid_file)
    try:
        wait_ready(hub.public_url, proc, timeout)
    except BaseException as exc:
        hub.stop()
        raise RuntimeError(f"{exc}; hub log:\n{hub.log_tail()}") from exc
    return hub
