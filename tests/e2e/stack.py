"""The SPE API and the Keycloak-backed hub on loopback ports, for end-to-end tests and benches.

:class:`Stack` starts the API (uvicorn) and the hub (:mod:`workspaces.hub`) on ports chosen
here, with a data dir and control database given by the caller, and :meth:`Stack.stop` stops
both (the hub stops its servers on the way out). Jupyter helpers talk to a user server through
the proxy: :func:`run_code` executes code in a kernel over the websocket channels.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.ports import free_port
from workspaces.hub import HubProcess, start_hub

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    data_dir: Path
    database_url: str
    keycloak_url: str
    cgroup_parent: str = field(default_factory=lambda: f"spe-e2e-{uuid.uuid4().hex[:6]}")
    api_port: int = field(default_factory=free_port)
    hub_port: int = field(default_factory=free_port)
    public_port: int = field(default_factory=free_port)
    proxy_api_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    api: subprocess.Popen[bytes] | None = None
    hub: HubProcess | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "SPE_DATA_DIR": str(self.data_dir), "SPE_DATABASE_URL": self.database_url,
            "SPE_KEYCLOAK_URL": self.keycloak_url, "SPE_API_PORT": str(self.api_port),
            "SPE_WS_ALLOWED_HOST_PORTS": json.dumps([self.hub_port, self.api_port]),
            "SPE_WS_RUNTIME_DIR": str(REPO / "var" / "runtime"),
            "SPE_WS_CGROUP_PARENT": self.cgroup_parent,
            "SPE_HUB_OAUTH_CLIENT_SECRET": "jupyterhub-dev-secret",
            "SPE_HUB_PROXY_API_PORT": str(self.proxy_api_port),
            "SPE_HUB_PROXY_PORT": str(self.proxy_port),
            **self.extra_env,
        }

    @property
    def hub_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    def workspace_url(self, user: str, server: str) -> str:
        """The origin of (user, server)'s workspace and its server path (browser gate)."""
        from workspaces.browser_gate import workspace_host

        host = workspace_host(user, server, "localhost")
        return f"http://{host}:{self.public_port}/user/{user}/{server}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_api(self, timeout: float = 60.0) -> None:
        log = open(self.data_dir / "api.log", "ab")  # noqa: SIM115 - lives with the process
        self.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "spe.api.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.api_port), "--log-level", "warning"],
            cwd=str(REPO), env={**os.environ, **self.env}, stdout=log, stderr=log,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError((self.data_dir / "api.log").read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/openapi.json", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError("SPE API did not start")

    def start_hub(self) -> HubProcess:
        self.hub = start_hub(public_url=self.hub_url, env=self.env,
                             log_path=self.data_dir / "hub.log")
        return self.hub

    def stop(self) -> None:
        if self.hub is not None:
            self.hub.stop()
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            try:
                self.api.wait(15)
            except subprocess.TimeoutExpired:
                self.api.kill()
                self.api.wait(5)


def cookie_header(jar: Any, path: str) -> str:
    """``Cookie`` header value for a request to ``path`` on loopback."""
    return "; ".join(f"{c.name}={c.value}" for c in jar
                     if path.startswith(c.path or "/"))


def run_code(ws_url: str, headers: dict[str, str], code: str, timeout: float = 120.0) -> str:
    """Execute ``code`` in the kernel behind ``ws_url`` (…/api/kernels/<id>/channels);
    return its stdout (stderr and tracebacks appended)."""
    from websockets.sync.client import connect

    msg_id = uuid.uuid4().hex
    request = {
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }
    out: list[str] = []
    deadline = time.monotonic() + timeout
    with connect(ws_url, additional_headers=headers, open_timeout=30,
                 max_size=2**24) as ws:
        ws.send(json.dumps(request))
        replied = idle = False
        while not (replied and idle):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("kernel did not answer: " + "".join(out)[-2000:])
            msg = json.loads(ws.recv(timeout=left))
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                out.append("\n".join(content.get("traceback", [])))
            elif kind == "execute_reply":
                replied = True
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
    return "".join(out)
