"""infra/keycloak/keycloak.sh against the running server: a second start reuses it in seconds,
status and env describe it, and the realm JSON holds what the SPE relies on."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "keycloak" / "keycloak.sh"
REALM_FILE = SCRIPT.parent / "realm-spe.json"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_second_start_reuses_the_running_server_quickly(keycloak_url: str) -> None:
    port = keycloak_url.rsplit(":", 1)[1]
    started = time.monotonic()
    result = _run("start", "--port", port)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 15
    status = _run("status")
    assert status.returncode == 0 and "running" in status.stdout
    env = _run("env").stdout
    assert f"export SPE_TEST_KEYCLOAK_URL=http://127.0.0.1:{port}" in env


def test_discovery_advertises_asymmetric_signing_only(keycloak_url: str) -> None:
    config = httpx.get(f"{keycloak_url}/realms/spe/.well-known/openid-configuration").json()
    assert config["issuer"] == f"{keycloak_url}/realms/spe"
    keys = httpx.get(config["jwks_uri"]).json()["keys"]
    assert keys and all(k["kty"] in ("RSA", "EC", "OKP") for k in keys)


def test_realm_file_declares_roles_clients_and_short_tokens() -> None:
    realm = json.loads(REALM_FILE.read_text())
    assert realm["realm"] == "spe"
    assert realm["accessTokenLifespan"] <= 300
    roles = {r["name"] for r in realm["roles"]["realm"]}
    assert {"researcher", "access-body", "hospital-admin", "operator"} <= roles
    clients = {c["clientId"]: c for c in realm["clients"]}
    hub = clients["jupyterhub"]
    assert hub["publicClient"] is False and hub["standardFlowEnabled"] is True
    assert hub["attributes"]["pkce.code.challenge.method"] == "S256"
    assert not hub["directAccessGrantsEnabled"] and not hub["implicitFlowEnabled"]
    mappers = {m["protocolMapper"] for m in hub["protocolMappers"]}
    assert {"oidc-group-membership-mapper", "oidc-audience-mapper"} <= mappers
    for body in ("hdab-alpha", "hdab-beta"):
        client = clients[body]
        assert client["serviceAccountsEnabled"] and not client["standardFlowEnabled"]
        assert not client["directAccessGrantsEnabled"]
    users = {u["username"]: u for u in realm["users"]}
    assert users["dave"]["enabled"] is False
    assert "access-body" in users["service-account-hdab-alpha"]["realmRoles"]
