"""A minimal browser over httpx for end-to-end tests of login flows.

It follows redirects itself and, like browsers do for loopback origins (which they treat as
secure contexts), sends ``Secure`` cookies to ``http://127.0.0.1`` and ``http://localhost``:
Keycloak marks its session cookies ``Secure; SameSite=None`` even over plain HTTP.
"""

from __future__ import annotations

import html
import re
import socket
from typing import Any
from urllib.parse import urljoin

import httpx

LOOPBACK = ("127.0.0.1", "localhost", "localhost.local")

_getaddrinfo = socket.getaddrinfo


def _resolve_localhost(host: Any, *args: Any, **kwargs: Any) -> Any:
    """``*.localhost`` is loopback (RFC 6761): browsers resolve it themselves, glibc does not.
    Workspaces are served on such names (one origin each), so test clients resolve them too."""
    if isinstance(host, str | bytes):
        name = host.decode() if isinstance(host, bytes) else host
        if name.lower().rstrip(".").endswith(".localhost"):
            host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _resolve_localhost


class Browser:
    def __init__(self, timeout: float = 60.0) -> None:
        self.http = httpx.Client(follow_redirects=False, timeout=timeout)
        self.history: list[httpx.Response] = []

    def close(self) -> None:
        self.http.close()

    def _loopback_secure_cookies(self) -> None:
        jar = self.http.cookies.jar
        for cookie in [c for c in jar if c.domain == ".127.0.0.1"]:
            # JupyterHub (subdomain mode) sets its session id with Domain=<hub host>; for an IP
            # host browsers keep it for that host, http.cookiejar never sends it back
            jar.clear(cookie.domain, cookie.path, cookie.name)
            cookie.domain, cookie.domain_specified, cookie.domain_initial_dot = (
                "127.0.0.1", False, False)
            jar.set_cookie(cookie)
        for cookie in jar:
            if cookie.domain in LOOPBACK or cookie.domain.endswith(".localhost"):
                cookie.secure = False

    def request(self, method: str, url: str, *, max_redirects: int = 20,
                **kwargs: Any) -> httpx.Response:
        self.history = []
        for _ in range(max_redirects):
            self._loopback_secure_cookies()
            resp = self.http.request(method, url, **kwargs)
            self._loopback_secure_cookies()
            if resp.status_code not in (301, 302, 303, 307, 308) or "location" not in resp.headers:
                return resp
            self.history.append(resp)
            url = urljoin(str(resp.url), resp.headers["location"])
            if resp.status_code in (301, 302, 303):
                method, kwargs = "GET", {k: v for k, v in kwargs.items()
                                         if k not in ("data", "json", "content", "files")}
        raise RuntimeError(f"too many redirects ending at {url}")

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def cookie(self, name: str) -> str | None:
        for cookie in self.http.cookies.jar:
            if cookie.name == name:
                return cookie.value
        return None

    def keycloak_login(self, start_url: str, username: str, password: str) -> httpx.Response:
        """Open ``start_url`` (a hub login URL), fill Keycloak's login form, follow back."""
        page = self.get(start_url)
        if "kc-form-login" not in page.text:
            return page  # already logged in at Keycloak (SSO), or refused
        match = re.search(r'<form id="kc-form-login"[^>]*action="([^"]+)"', page.text)
        if match is None:
            raise AssertionError(f"no Keycloak login form at {page.url}")
        return self.post(html.unescape(match.group(1)), data={
            "username": username, "password": password, "credentialId": ""})
