"""What a researcher can do to her own workspace: replace the single-user server.

Researchers' code controls the single-user server. :func:`replace_server` does it the way a
researcher could: from a notebook, write a Jupyter config file in the workspace home that
``exec``s her own program on the server's address (``--ip``/``--port``), then restart the
workspace through the hub. The program gets the address and ``args``; the hub sees a server
that answers, and routes browsers to it.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

from tests.e2e.stack import Stack, cookie_header, run_code

#: Serves every GET: files named in the path from the home (``/<any>/extract.bin``), else
#: ``page.html`` from the home when present, else a JSON version document (the hub's check).
HTTP_SERVER = textwrap.dedent("""
    import http.server, os, sys
    ip, port, home = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def _send(self, status, ctype, body=None, path=None):
            size = len(body) if body is not None else os.path.getsize(path)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin", "*"))
            self.send_header("Access-Control-Allow-Credentials", "true")
            self.end_headers()
            if body is not None:
                self.wfile.write(body)
                return
            with open(path, "rb") as f:
                while chunk := f.read(65536):
                    self.wfile.write(chunk)
        def do_GET(self):
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            if name == "extract.bin" or "/files/" in self.path:
                return self._send(200, "application/octet-stream",
                                  path=os.path.join(home, "extract.bin"))
            page = os.path.join(home, "page.html")
            if os.path.exists(page) and not self.path.split("?")[0].endswith("/api"):
                return self._send(200, "text/html; charset=utf-8", path=page)
            self._send(200, "application/json", b'{"version": "2.0.0"}')
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer((ip, port), H).serve_forever()
""")


def replace_server(stack: Stack, browser: Any, name: str, pid: str, base: str,
                   files: dict[str, bytes], xsrf: dict[str, str], setup: str = "") -> None:
    """Write ``files`` into the home of (alice, ``name``) and run ``setup`` there (Python, in
    a kernel), replace its server with :data:`HTTP_SERVER` and restart it; returns when the
    hub sees it ready."""
    from tests.integration.test_hub_keycloak import _server, _spawn, _xsrf

    kernel = browser.post(f"{base}/api/kernels", headers=xsrf, json={"name": "python3"})
    assert kernel.status_code == 201, kernel.text
    ws_url = base.replace("http://", "ws://", 1) + f"/api/kernels/{kernel.json()['id']}/channels"
    cookie = cookie_header([c for c in browser.http.cookies.jar
                            if c.domain.endswith(".localhost")], f"/user/alice/{name}/")
    out = run_code(ws_url, {"Cookie": cookie}, textwrap.dedent(f"""
        import os, sys
        from jupyter_core.paths import jupyter_config_dir
        home = os.path.expanduser("~")
        for fname, data in {dict(files, **{"server.py": HTTP_SERVER.encode()})!r}.items():
            with open(os.path.join(home, fname), "wb") as f:
                f.write(data)
        cfg = jupyter_config_dir()
        os.makedirs(cfg, exist_ok=True)
        with open(os.path.join(cfg, "jupyter_server_config.py"), "w") as f:
            f.write("import os, sys\\n"
                    "a = dict(x[2:].split('=', 1) for x in sys.argv if x.startswith('--ip=')"
                    " or x.startswith('--port='))\\n"
                    "os.execv(sys.executable, [sys.executable, {{s!r}}, a['ip'], a['port'],"
                    " {{h!r}}])\\n".format(s=os.path.join(home, "server.py"), h=home))
        print("written", cfg)
    """) + "\n" + setup)
    assert "written" in out, out
    hub = stack.hub_url
    stop = browser.request("DELETE", f"{hub}/hub/api/users/alice/servers/{name}",
                           headers=_xsrf(browser))
    assert stop.status_code in (202, 204), stop.text
    t0 = time.monotonic()
    while _server(stack, browser, "alice", name) is not None:
        assert time.monotonic() - t0 < 30
        time.sleep(0.2)
    _spawn(stack, browser, "alice", pid)
