"""Fixtures for tests against the real Keycloak started by ``infra/keycloak/keycloak.sh``.

Start it with ``scripts/services.sh start`` (or ``infra/keycloak/keycloak.sh start``) and
``eval "$(infra/keycloak/keycloak.sh env)"``; without ``SPE_TEST_KEYCLOAK_URL`` the tests that
use these fixtures are skipped locally and FAIL when the ``CI`` variable is set.

Fixtures (names are the contract other packages' tests use):

* ``keycloak_url`` (session): base URL, e.g. ``http://127.0.0.1:8180``.
* ``keycloak_admin`` (session): a python-keycloak ``KeycloakAdmin`` on realm ``spe``.
* ``user_token(username)`` (session): an access token of a demo user (password grant on the
  test-only ``spe-tests`` client). Demo users: researchers ``alice``, ``bob``, ``carol``;
  hospital admins ``hadmin``, ``hadmin2``; operator ``op``; disabled researcher ``dave``.
* ``client_token(client_id)`` (session): a client-credentials token of an access body
  (``hdab-alpha``, ``hdab-beta``).
* ``user_headers(username)`` / ``client_headers(client_id)``: ``{"Authorization": ...}``.
* ``api_settings``: ``Settings`` pointing at that Keycloak, a temporary data dir and the
  ``db_url`` database (so it runs on SQLite and PostgreSQL like ``db``).
* ``api_app``: ``spe.api.app.create_app(api_settings, db)``.
* ``api_client``: a ``fastapi.testclient.TestClient`` for ``api_app``.

Module helpers: ``bearer(token)``, ``password_of(username)``, ``secret_of(client_id)``,
``fetch_user_token``/``fetch_client_token`` (raise :class:`TokenRequestRefused` on refusal).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from spe.config import Settings
from spe.db import Database

REALM = os.environ.get("SPE_TEST_KEYCLOAK_REALM", "spe")
TEST_CLIENT = "spe-tests"
RESEARCHERS = ("alice", "bob", "carol")
HOSPITAL_ADMINS = ("hadmin", "hadmin2")
OPERATORS = ("op",)
DISABLED_USERS = ("dave",)
ACCESS_BODIES = ("hdab-alpha", "hdab-beta")
_TOKEN_REUSE_SECONDS = 120  # realm access tokens live 300 s


class TokenRequestRefused(Exception):
    """Keycloak refused to issue a token; ``error`` is its OAuth error code."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status, self.error, self.description = status, error, description


def password_of(username: str) -> str:
    """Dev-only password of a demo user (see infra/keycloak/README.md)."""
    return f"{username}-dev-password"


def secret_of(client_id: str) -> str:
    """Dev-only secret of a confidential demo client."""
    return f"{client_id}-dev-secret"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_endpoint(url: str) -> str:
    return f"{url}/realms/{REALM}/protocol/openid-connect/token"


def _request_token(url: str, form: dict[str, str]) -> dict[str, Any]:
    response = httpx.post(token_endpoint(url), data=form, timeout=30)
    body = response.json()
    if response.status_code != 200:
        raise TokenRequestRefused(response.status_code, body.get("error", "?"),
                                  body.get("error_description", ""))
    return dict(body)


def fetch_user_token(url: str, username: str, password: str | None = None) -> str:
    """A fresh access token for ``username`` (password grant on the spe-tests client)."""
    body = _request_token(url, {"grant_type": "password", "client_id": TEST_CLIENT,
                                "username": username,
                                "password": password or password_of(username),
                                "scope": "openid"})
    return str(body["access_token"])


def fetch_client_token(url: str, client_id: str, secret: str | None = None) -> str:
    """A fresh client-credentials access token for an access-body client."""
    body = _request_token(url, {"grant_type": "client_credentials", "client_id": client_id,
                                "client_secret": secret or secret_of(client_id)})
    return str(body["access_token"])


@pytest.fixture(scope="session")
def keycloak_url() -> str:
    """Base URL of the running Keycloak (skip locally / fail in CI when not configured)."""
    url = os.environ.get("SPE_TEST_KEYCLOAK_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("SPE_TEST_KEYCLOAK_URL is not set in CI: Keycloak must be tested")
        pytest.skip("Keycloak not started (run scripts/services.sh start and eval its output)")
    url = url.rstrip("/")
    discovery = f"{url}/realms/{REALM}/.well-known/openid-configuration"
    try:
        httpx.get(discovery, timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"Keycloak at {url} does not answer for realm {REALM}: {exc}")
    return url


def _cached(fetch: Callable[[str], str]) -> Callable[[str], str]:
    cache: dict[str, tuple[float, str]] = {}

    def get(name: str) -> str:
        hit = cache.get(name)
        if hit is not None and time.monotonic() - hit[0] < _TOKEN_REUSE_SECONDS:
            return hit[1]
        token = fetch(name)
        cache[name] = (time.monotonic(), token)
        return token

    return get


@pytest.fixture(scope="session")
def user_token(keycloak_url: str) -> Callable[[str], str]:
    """``user_token("alice")``: a (cached, still valid) access token of a demo user."""
    return _cached(lambda name: fetch_user_token(keycloak_url, name))


@pytest.fixture(scope="session")
def client_token(keycloak_url: str) -> Callable[[str], str]:
    """``client_token("hdab-alpha")``: a (cached) client-credentials token of an access body."""
    return _cached(lambda name: fetch_client_token(keycloak_url, name))


@pytest.fixture(scope="session")
def user_headers(user_token: Callable[[str], str]) -> Callable[[str], dict[str, str]]:
    """``user_headers("alice")``: Authorization headers for a demo user."""
    return lambda name: bearer(user_token(name))


@pytest.fixture(scope="session")
def client_headers(client_token: Callable[[str], str]) -> Callable[[str], dict[str, str]]:
    """``client_headers("hdab-alpha")``: Authorization headers for an access-body client."""
    return lambda name: bearer(client_token(name))


@pytest.fixture(scope="session")
def keycloak_admin(keycloak_url: str) -> Any:
    """python-keycloak ``KeycloakAdmin`` on the test realm (bootstrap admin credentials)."""
    from keycloak import KeycloakAdmin, KeycloakOpenIDConnection

    connection = KeycloakOpenIDConnection(
        server_url=keycloak_url,
        username=os.environ.get("SPE_TEST_KEYCLOAK_ADMIN_USER", "admin"),
        password=os.environ.get("SPE_TEST_KEYCLOAK_ADMIN_PASSWORD", "admin"),
        realm_name=REALM,
        user_realm_name="master",
        client_id="admin-cli",
        verify=True,
    )
    return KeycloakAdmin(connection=connection)


@pytest.fixture
def api_settings(tmp_path: Path, db_url: str, keycloak_url: str) -> Settings:
    """Settings for an API that validates tokens against the test Keycloak."""
    return Settings(
        data_dir=tmp_path / "var",
        database_url=db_url,
        keycloak_url=keycloak_url,
        keycloak_realm=REALM,
        keycloak_admin_user=os.environ.get("SPE_TEST_KEYCLOAK_ADMIN_USER", "admin"),
        keycloak_admin_password=os.environ.get("SPE_TEST_KEYCLOAK_ADMIN_PASSWORD", "admin"),
    )


@pytest.fixture
def api_app(api_settings: Settings, db: Database) -> FastAPI:
    """The SPE API app on ``db`` with token validation against the test Keycloak."""
    from spe.api.app import create_app

    return create_app(api_settings, db)


@pytest.fixture
def api_client(api_app: FastAPI) -> Iterator[TestClient]:
    """A TestClient for ``api_app`` (no Authorization header by default)."""
    with TestClient(api_app) as client:
        yield client


@pytest.fixture
def server_url(api_app: FastAPI) -> Iterator[str]:
    """``api_app`` served by uvicorn on a free loopback port, in a thread."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api_app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class RealmForgeKey:
    """A key the test session adds to the realm (lowest priority, so Keycloak never signs with
    it) so tests can forge tokens the realm's JWKS vouches for: expired, wrong issuer, ..."""

    def __init__(self, kid: str, private_key: Any, issuer: str) -> None:
        self.kid, self.private_key, self.issuer = kid, private_key, issuer

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Claims of a valid researcher access token; ``overrides`` replace or (None) drop."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": ["spe-api", "account"], "sub": "forged-subject",
            "typ": "Bearer", "azp": TEST_CLIENT, "iat": now, "nbf": now, "exp": now + 300,
            "jti": f"forged-{now}", "preferred_username": "alice",
            "realm_access": {"roles": ["researcher"]},
        }
        for key, value in overrides.items():
            if value is None:
                claims.pop(key, None)
            else:
                claims[key] = value
        return claims

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        import jwt

        return jwt.encode(claims, self.private_key, algorithm="RS256",
                          headers={"kid": self.kid, **header})


@pytest.fixture(scope="session")
def realm_forge_key(keycloak_url: str, keycloak_admin: Any) -> Iterator[RealmForgeKey]:
    """An RSA key published in the realm's JWKS for the test session (removed afterwards)."""
    import uuid

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    realm_id = keycloak_admin.get_realm(REALM)["id"]
    name = f"spe-tests-forge-{uuid.uuid4().hex[:8]}"
    component_id = keycloak_admin.create_component({
        "name": name, "providerId": "rsa", "providerType": "org.keycloak.keys.KeyProvider",
        "parentId": realm_id,
        "config": {"priority": ["1"], "enabled": ["true"], "active": ["true"],
                   "algorithm": ["RS256"], "keyUse": ["sig"], "privateKey": [pem]},
    })
    try:
        keys = keycloak_admin.get_keys()["keys"]
        kid = next(k["kid"] for k in keys if k.get("providerId") == component_id)
        yield RealmForgeKey(kid, private, f"{keycloak_url}/realms/{REALM}")
    finally:
        keycloak_admin.delete_component(component_id)
