"""TLS for `spe up`: the listeners' certificate files and what the SPE's own clients trust.

Contract:
- :func:`with_local_tls` returns the settings with ``tls_*`` files pointing at a local
  development CA kept in ``data_dir/tls`` (mode 0700, keys 0600; never mounted into a
  workspace), made on first use by :func:`spe.tls.ensure_local_ca` for the API's host, the
  hub's host and the workspaces' user domain. Settings that already name certificate files
  are returned unchanged: a production deployment brings its own.
- :func:`uvicorn_tls` gives uvicorn's keyword arguments to serve the API and console over TLS
  (nothing when no certificate is set).
- :func:`hub_tls_env` gives the hub's environment for TLS: the browser gate's certificate and
  key (``SPE_GATE_SSL_CERT``/``SPE_GATE_SSL_KEY``) and the CA bundle its processes trust
  (``SSL_CERT_FILE``, read by httpx and Python's ssl defaults); when the API serves HTTPS
  also ``SPE_TLS_CA_FILE``, from which the spawner makes the workspaces' API address https.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from spe.config import Settings
from spe.tls import ensure_local_ca


def with_local_tls(s: Settings, hub_url: str, user_domain: str | None = None) -> Settings:
    """``s`` with the local development CA's files, unless it names certificate files.

    ``user_domain`` (default: the hub's ``SPE_HUB_USER_DOMAIN``, else ``localhost``) is named
    as ``*.<user_domain>``; TLS clients refuse a wildcard right under a top-level name, so the
    workspaces' origins verify only with a domain of two labels or more (``spe.localhost``)."""
    if s.tls_cert_file is not None:
        return s
    if user_domain is None:
        user_domain = os.environ.get("SPE_HUB_USER_DOMAIN", "localhost")
    hosts = [h for h in (s.api_host, urlsplit(hub_url).hostname) if h]
    hosts.append(f"*.{user_domain}")
    files = ensure_local_ca(s.data_dir / "tls", hosts)
    return s.model_copy(update={"tls_cert_file": files.cert_file, "tls_key_file":
                                files.key_file, "tls_ca_file": files.ca_file})


def uvicorn_tls(s: Settings) -> tuple[str | None, str | None]:
    """uvicorn.run's ``ssl_certfile`` and ``ssl_keyfile`` for the API and console listener
    (``None`` both: plain HTTP)."""
    if s.tls_cert_file is None or s.tls_key_file is None:
        return None, None
    return str(s.tls_cert_file), str(s.tls_key_file)


def hub_tls_env(s: Settings) -> dict[str, str]:
    """Environment that makes the hub's public gate serve TLS and its clients trust the CA."""
    env: dict[str, str] = {}
    if s.tls_cert_file is not None and s.tls_key_file is not None:
        env["SPE_GATE_SSL_CERT"] = str(s.tls_cert_file.resolve())
        env["SPE_GATE_SSL_KEY"] = str(s.tls_key_file.resolve())
    if s.tls_ca_file is not None:
        env["SSL_CERT_FILE"] = str(s.tls_ca_file.resolve())
        if s.tls_cert_file is not None:
            # The API serves HTTPS: the spawner gives workspaces an https API address and a
            # read-only copy of this CA bundle (certificates only).
            env["SPE_TLS_CA_FILE"] = env["SSL_CERT_FILE"]
    return env


def trust_ca_in_process(s: Settings) -> None:
    """Let this process's HTTPS clients (API to Keycloak, console token exchange) trust
    ``tls_ca_file``; the bundle must then hold every CA they need (Keycloak's included)."""
    if s.tls_ca_file is not None:
        os.environ["SSL_CERT_FILE"] = str(s.tls_ca_file.resolve())
