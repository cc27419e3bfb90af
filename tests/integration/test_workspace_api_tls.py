"""spe.client inside a real bubblewrap sandbox reaches an HTTPS SPE API (issue 16, --tls).

The workspace gets the address ``https://spe-api.internal:<port>`` (its /etc/hosts maps the name
to the host end of its veth; nftables lets only the allowed port through) and trusts only the
CA certificate bound read-only into its /etc. The API here is a small HTTPS server on host
loopback with the local CA's leaf, answering the one route the client calls. Needs root,
bubblewrap, nftables, iproute2 and the built workspace runtime (var/runtime).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from spe.tls import ensure_local_ca
from workspaces.backend import BubblewrapBackend, SandboxRequest
from workspaces.settings import WorkspaceSettings
from workspaces.spawner import workspace_api_env

RUNTIME = Path("var/runtime").resolve()
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv"))
    or not (RUNTIME / "bin" / "python").exists(),
    reason="needs root, bubblewrap, nftables, iproute2, setpriv and the runtime in var/runtime",
)
CLIENT = (
    "import spe.client\n"
    "try:\n"
    "    print('PERMIT', spe.client.connect().permit()['id'], flush=True)\n"
    "except Exception as exc:\n"
    "    print('FAILED', type(exc).__name__, exc, flush=True)\n"
)


class _Api(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/v1/permits/P-1" and self.headers.get("Authorization") == "Bearer t"
        body = json.dumps({"id": "P-1"} if ok else {"title": "no"}).encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_client_in_sandbox_reaches_the_api_over_tls(tmp_path: Path) -> None:
    files = ensure_local_ca(tmp_path / "tls")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(files.cert_file), str(files.key_file))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    settings = WorkspaceSettings(
        runtime_dir=RUNTIME,
        allowed_host_ports=(port,),
        cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}",
        disk_quota=False,
    )
    bw = BubblewrapBackend(settings, tmp_path / "workspaces")
    handle = bw.provision(
        SandboxRequest(
            ws_id=f"t{uuid.uuid4().hex[:11]}",
            person="alice",
            permit_id="P-1",
            quota=ComputeQuota(cpus=1.0, memory_mb=512, disk_mb=64),
            ca_file=files.ca_file,
        )
    )
    try:
        env = {
            **workspace_api_env(bw.host_url(handle, port), tls=True),
            "SPE_TOKEN": "t",
            "SPE_PERMIT_ID": "P-1",
        }
        assert env["SPE_API_URL"] == f"https://spe-api.internal:{port}"
        python = str(RUNTIME / "bin" / "python")
        log = handle.root / "client.log"
        assert bw.start(handle, [python, "-c", CLIENT], env=env, log=log).wait(60) == 0
        assert "PERMIT P-1" in log.read_text(), log.read_text()
        # Control: without the bound CA the same client refuses the API's certificate.
        plain = {k: v for k, v in env.items() if k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
        log2 = handle.root / "control.log"
        assert bw.start(handle, [python, "-c", CLIENT], env=plain, log=log2).wait(60) == 0
        assert "FAILED ConnectError" in log2.read_text(), log2.read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in log2.read_text()
        # The key is nowhere in the sandbox: only the CA certificate was copied into its /etc.
        etc = handle.root / "etc"
        assert not any("PRIVATE KEY" in p.read_text() for p in etc.iterdir())
    finally:
        bw.destroy(handle, remove_home=True)
        httpd.shutdown()
        httpd.server_close()
