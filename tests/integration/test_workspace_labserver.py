"""The workspace's Jupyter server extension (:mod:`workspaces.labserver`, issue 15) against the
real API: a real Jupyter server from the workspace runtime (which enables the extension by its
own configuration) asks a real uvicorn-served SPE API with a workspace token read from the token
file, and the JupyterLab panel's routes answer the permit, the budget and the exports, refuse
requests without the server's login, refuse files outside the root, and never hand out the
workspace token.

Needs Keycloak (the access body issues the permit) and the workspace runtime
(``python -m workspaces.runtime build var/runtime``).
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from spe.client import Client
from spe.config import Settings
from spe.db import Database
from tests.integration.test_dp_api import (  # noqa: F401 - fixtures
    SQL,
    Permits,
    _workspace_token,
    api_settings,
    dataset,
    omop_source,
)
from tests.ports import free_port
from workspaces import labserver, runtime
from workspaces.errors import StaleRuntime

RUNTIME = runtime.ROOT / "var" / "runtime"

pytestmark = [
    pytest.mark.keycloak,
    pytest.mark.skipif(not (RUNTIME / ".spe-runtime").is_file(),
                       reason="no workspace runtime (python -m workspaces.runtime build "
                              "var/runtime, run by scripts/setup.sh)"),
]


@pytest.fixture(scope="module", autouse=True)
def current_runtime() -> None:
    """The project's code as it is now in the runtime, as the spawner does before a start."""
    try:
        runtime.ensure_current(RUNTIME)
    except StaleRuntime as exc:
        pytest.skip(str(exc))


class Lab:
    def __init__(self, url: str, login: str, root: Path) -> None:
        self.url, self.login, self.root = url, login, root

    def get(self, path: str, *, auth: bool = True) -> httpx.Response:
        headers = {"Authorization": f"token {self.login}"} if auth else {}
        return httpx.get(self.url + path, headers=headers, timeout=60)

    def post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> httpx.Response:
        headers = {"Authorization": f"token {self.login}"} if auth else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)


@contextlib.contextmanager
def _start_lab(tmp: Path, api_url: str, permit_id: str, token: str,
               app: str = "jupyter-server") -> Iterator[Lab]:
    home, root = tmp / "home", tmp / "home" / "work"
    root.mkdir(parents=True)
    token_file = home / ".spe" / "token"
    token_file.parent.mkdir()
    token_file.write_text(token)
    login, port = secrets.token_hex(16), free_port()
    env = {"HOME": str(home), "PATH": f"{RUNTIME}/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "SPE_API_URL": api_url, "SPE_PERMIT_ID": permit_id,
           "SPE_TOKEN_FILE": str(token_file), "JUPYTER_CONFIG_DIR": str(home / ".jupyter")}
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(RUNTIME / "bin" / app), "--no-browser", "--allow-root",
         "--ip=127.0.0.1", f"--port={port}", f"--ServerApp.root_dir={root}",
         f"--IdentityProvider.token={login}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    lab = Lab(f"http://127.0.0.1:{port}", login, root)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                if lab.get("/api/status").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        yield lab
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture
def permit(server_url: str, db: Database,
           api_settings: Settings, dataset: str,  # noqa: F811
           client_headers: Any) -> Iterator[tuple[Permits, str, str]]:
    with httpx.Client(base_url=server_url, timeout=60) as http:
        permits = Permits(http.post, client_headers("hdab-alpha"))
        try:
            pid = permits.issue("LAB/0015/2026/FI")
            token = _workspace_token(db, api_settings, pid)["Authorization"].split()[1]
            yield permits, pid, token
        finally:
            permits.cleanup()


def test_panel_routes_answer_from_the_api(permit: tuple[Permits, str, str],
                                          server_url: str,
                                          tmp_path: Path) -> None:
    permits, pid, token = permit
    Client(server_url, token, pid).sql(SQL, epsilon=0.2)  # spend some of the budget
    with _start_lab(tmp_path, server_url, pid, token) as lab:
        # Without the server's own login: refused like the rest of JupyterLab's API.
        assert lab.get("/spe/overview", auth=False).status_code == 403
        assert lab.post("/spe/exports", {"paths": ["a"], "justification": "x"},
                        auth=False).status_code == 403

        resp = lab.get("/spe/overview")
        assert resp.status_code == 200, resp.text
        seen = [resp.text]
        overview = resp.json()
        p = overview["permit"]
        assert p["id"] == pid and p["reference"] == "LAB/0015/2026/FI"
        assert p["status"] == "active" and p["title"]
        assert p["datasets"][0]["dataset"] == "dpdemo"
        assert "gender_concept_id" in p["datasets"][0]["tables"]["person"]
        assert set(p) == set(labserver.PERMIT_FIELDS)
        assert "persons" not in p and "holder" not in p  # only what the panel shows
        b = overview["budget"]
        assert b["epsilon_total"] == pytest.approx(1.0)
        assert b["epsilon_spent"] == pytest.approx(0.2) and b["queries"] == 1
        [query] = overview["queries"]
        assert query["epsilon"] == pytest.approx(0.2) and query["state"] == "released"
        assert set(query) == {"id", "created_at", "state", "epsilon", "delta"}  # no SQL, person

        # Files outside the workspace's root are refused before anything is sent.
        outside = tmp_path / "secret.csv"
        outside.write_text("a\n1\n")
        for bad in ("../secret.csv", str(outside), "missing.csv", ""):
            r = lab.post("/spe/exports", {"paths": [bad], "justification": "results"})
            assert r.status_code == 400, (bad, r.text)
            seen.append(r.text)
        (lab.root / "link.csv").symlink_to(outside)
        assert lab.post("/spe/exports", {"paths": ["link.csv"],
                                         "justification": "results"}).status_code == 400

        # A file of the workspace goes through the airlock; the request is then listed.
        (lab.root / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        r = lab.post("/spe/exports", {"paths": ["figure.png"],
                                      "justification": "a figure for the paper"})
        assert r.status_code == 201, r.text
        seen.append(r.text)
        request = r.json()
        assert [f["name"] for f in request["files"]] == ["figure.png"]
        listed = lab.get("/spe/overview")
        seen.append(listed.text)
        assert request["id"] in [e["id"] for e in listed.json()["exports"]]

        # Suspended: the API refuses the workspace token; the panel says so, without secrets.
        permits.change(pid, "suspend")
        r = lab.get("/spe/overview")
        assert r.status_code == 200
        seen.append(r.text)
        assert r.json()["budget"]["error"]["status"] in (401, 403)

        for text in seen:  # the workspace token never reaches the browser
            assert token not in text and server_url not in text


@pytest.mark.skipif(not (runtime.ROOT / runtime.LABEXTENSION_BUILD / "package.json").is_file(),
                    reason="the JupyterLab extension is built by scripts/setup.sh (npm)")
def test_runtime_serves_the_prebuilt_extension() -> None:
    out = subprocess.run([str(RUNTIME / "bin" / "jupyter"), "labextension", "list"],
                         capture_output=True, text=True, timeout=120, check=True)
    line = next(ln for ln in (out.stdout + out.stderr).splitlines()
                if runtime.LABEXTENSION_NAME in ln)
    assert "enabled" in line and "OK" in line, line
