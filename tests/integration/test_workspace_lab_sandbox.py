"""The researcher's side inside a real sandbox, against the real API (issue 15).

In a bubblewrap workspace (own Unix user, seccomp, cgroup, its own network namespace whose only
way out is the API's port through nftables) with the workspace token in ``~/.spe/token``:

- the runtime's Jupyter server loads the SPE server extension by the runtime's configuration,
  and its ``spe/overview`` route answers the permit and the budget from the API;
- a new Python kernel runs a ``%%dp`` cell without ``%load_ext``: a real DP query, charged to
  the permit's budget.

Needs root, bubblewrap, nftables, iproute2, Keycloak and the workspace runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from permits.terms import ComputeQuota
from spe.client import Client
from tests.integration.test_dp_api import (  # noqa: F401 - fixtures used by name
    SQL,
    Permits,
    api_settings,
    dataset,
    omop_source,
)
from tests.integration.test_workspace_labserver import (  # noqa: F401 - fixtures used by name
    RUNTIME,
    current_runtime,
    permit,
)
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings
from workspaces.token_refresh import write_token_file

pytestmark = [
    pytest.mark.keycloak, pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv")),
        reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv"),
]

DRIVER = textwrap.dedent("""
    import json, os, secrets, subprocess, sys, time, urllib.request
    from jupyter_client.manager import start_new_kernel
    login = secrets.token_hex(16)
    log = open(os.path.join(os.environ["HOME"], "server.log"), "wb")
    server = subprocess.Popen(
        [sys.prefix + "/bin/jupyter-server", "--no-browser", "--ip=127.0.0.1", "--port=8899",
         "--IdentityProvider.token=" + login, "--ServerApp.root_dir=" + os.environ["HOME"]],
        stdout=log, stderr=log)
    def get(path):
        req = urllib.request.Request("http://127.0.0.1:8899" + path,
                                     headers={"Authorization": "token " + login})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    try:
        for _ in range(240):
            try:
                get("/api/status")
                break
            except OSError:
                time.sleep(0.25)
        overview = get("/spe/overview")
    finally:
        server.terminate()
        server.wait(15)
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120)
    out = []
    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("ERROR " + msg["content"]["evalue"])
    try:
        reply = kc.execute_interactive(sys.argv[1], output_hook=hook, timeout=240)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(json.dumps({"overview": overview, "status": reply["content"]["status"],
                      "cell": "".join(out)}))
""")


@pytest.fixture
def workspace(tmp_path: Path, server_url: str) -> Iterator[Workspace]:
    port = urlsplit(server_url).port
    assert port is not None
    settings = WorkspaceSettings(runtime_dir=RUNTIME, allowed_host_ports=(port,),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    ws = Workspace.provision(
        workspaces_dir=tmp_path / "var" / "workspaces", person="alice", permit_id="P-15",
        quota=ComputeQuota(cpus=1.0, memory_mb=1536), settings=settings,
        ws_id=f"t{uuid.uuid4().hex[:11]}")
    try:
        yield ws
    finally:
        ws.destroy(remove_home=True)


def test_panel_route_and_dp_magic_inside_the_sandbox(
        permit: tuple[Permits, str, str], server_url: str,  # noqa: F811
        workspace: Workspace) -> None:
    _permits, pid, token = permit
    ws = workspace
    assert ws.network is not None
    port = urlsplit(server_url).port
    assert port is not None
    write_token_file(ws.spec.home, ws.account.uid, ws.account.gid, token)
    env = {"SPE_API_URL": ws.network.url(port), "SPE_PERMIT_ID": pid,
           "SPE_TOKEN_FILE": f"{ws.spec.home_in_sandbox}/.spe/token"}
    cell = "%%dp --epsilon 0.2 --out by_gender\n" + SQL
    proc = ws.run([str(RUNTIME.resolve() / "bin" / "python"), "-c", DRIVER, cell],
                  env=env, timeout=420)
    log = ws.spec.home / "server.log"
    assert proc.returncode == 0, (proc.stderr[-3000:],
                                  log.read_text()[-3000:] if log.exists() else "")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])

    overview = result["overview"]
    assert overview["permit"]["id"] == pid and overview["permit"]["status"] == "active"
    assert overview["budget"]["epsilon_total"] == pytest.approx(1.0)
    assert overview["exports"] == []

    assert result["status"] == "ok", result["cell"]
    assert "cost: epsilon 0.2" in result["cell"] and "budget left: epsilon 0.8" in result["cell"]
    assert token not in result["cell"]
    # The query was charged to the permit: the budget says so from outside the sandbox.
    spent = Client(server_url, token, pid).budget(plot=False).data["epsilon_spent"]
    assert spent == pytest.approx(0.2)
