"""Forged and mangled bearer tokens are refused with a 401 problem that names what is wrong and
never echoes the token. Claim checks are proven with a key the real realm publishes (added for
the test session), so each refusal is caused by the claim under test, not by the signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient

from spe.auth.jwks import JWKSCache
from tests.keycloak_fixtures import RealmForgeKey, bearer


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _refused(client: TestClient, token: str, fragment: str) -> dict[str, Any]:
    response = client.get("/v1/me", headers=bearer(token))
    assert response.status_code == 401, response.text
    problem = response.json()
    assert problem["type"].endswith("/not-authenticated")
    assert fragment.lower() in problem["detail"].lower(), problem["detail"]
    assert token not in response.text
    for part in token.split("."):
        if len(part) > 8:
            assert part not in response.text
    return problem


def test_forged_token_with_realm_key_is_accepted_as_control(
    api_client: TestClient, realm_forge_key: RealmForgeKey
) -> None:
    token = realm_forge_key.sign(realm_forge_key.claims())
    response = api_client.get("/v1/me", headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["username"] == "alice"


def test_expired_token_is_refused(api_client: TestClient, realm_forge_key: RealmForgeKey) -> None:
    now = int(time.time())
    leeway = 30
    token = realm_forge_key.sign(realm_forge_key.claims(iat=now - 900, nbf=now - 900,
                                                        exp=now - leeway - 5))
    _refused(api_client, token, "expired")
    # within the leeway it is still accepted
    ok = realm_forge_key.sign(realm_forge_key.claims(iat=now - 900, nbf=now - 900, exp=now - 5))
    assert api_client.get("/v1/me", headers=bearer(ok)).status_code == 200


def test_not_yet_valid_token_is_refused(
    api_client: TestClient, realm_forge_key: RealmForgeKey
) -> None:
    now = int(time.time())
    token = realm_forge_key.sign(realm_forge_key.claims(nbf=now + 600, exp=now + 900))
    _refused(api_client, token, "not yet valid")


def test_wrong_issuer_is_refused(api_client: TestClient, realm_forge_key: RealmForgeKey) -> None:
    other = realm_forge_key.issuer.replace("/realms/spe", "/realms/master")
    _refused(api_client, realm_forge_key.sign(realm_forge_key.claims(iss=other)), "issued by")
    _refused(api_client, realm_forge_key.sign(realm_forge_key.claims(iss=None)), "'iss'")


def test_wrong_audience_is_refused(api_client: TestClient, realm_forge_key: RealmForgeKey) -> None:
    _refused(api_client, realm_forge_key.sign(realm_forge_key.claims(aud=["account"])),
             "audience")
    _refused(api_client, realm_forge_key.sign(realm_forge_key.claims(aud=None)), "'aud'")


def test_refresh_and_id_token_types_are_refused(
    api_client: TestClient, realm_forge_key: RealmForgeKey
) -> None:
    _refused(api_client, realm_forge_key.sign(realm_forge_key.claims(typ="ID")),
             "only access tokens")


def test_tampered_signature_or_payload_is_refused(
    api_client: TestClient, user_token: Callable[[str], str]
) -> None:
    header, payload, signature = user_token("alice").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["realm_access"] = {"roles": ["researcher", "operator", "hospital-admin"]}
    _refused(api_client, f"{header}.{_b64(claims)}.{signature}", "signature")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    _refused(api_client, f"{header}.{payload}.{flipped}", "signature")


def test_alg_none_is_refused(api_client: TestClient, user_token: Callable[[str], str]) -> None:
    header_b64, payload, _ = user_token("alice").split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    for alg in ("none", "None", "NONE"):
        forged = f"{_b64({**header, 'alg': alg})}.{payload}."
        _refused(api_client, forged, "algorithm")


def test_hs256_signed_with_the_realm_public_key_is_refused(
    api_client: TestClient, keycloak_url: str, user_token: Callable[[str], str]
) -> None:
    token = user_token("alice")
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, options={"verify_signature": False})
    jwks = httpx.get(f"{keycloak_url}/realms/spe/protocol/openid-connect/certs").json()
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    public = jwt.PyJWK(jwk).key
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, json.dumps(jwk).encode(), base64.b64encode(pem)):
        header = _b64({"alg": "HS256", "typ": "JWT", "kid": kid})
        body = _b64(claims)
        sig = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
        forged = f"{header}.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
        _refused(api_client, forged, "algorithm")


def test_unknown_kid_and_own_keys_are_refused(
    api_client: TestClient, realm_forge_key: RealmForgeKey
) -> None:
    claims = realm_forge_key.claims()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _refused(api_client, jwt.encode(claims, rsa_key, algorithm="RS256",
                                    headers={"kid": f"attacker-{uuid.uuid4()}"}), "unknown kid")
    # the attacker reuses the realm's kid: the signature does not verify
    _refused(api_client, jwt.encode(claims, rsa_key, algorithm="RS256",
                                    headers={"kid": realm_forge_key.kid}), "signature")
    # another algorithm family under the realm's kid
    ec_key = ec.generate_private_key(ec.SECP256R1())
    _refused(api_client, jwt.encode(claims, ec_key, algorithm="ES256",
                                    headers={"kid": realm_forge_key.kid}), "does not match")
    # no kid at all
    _refused(api_client, jwt.encode(claims, rsa_key, algorithm="RS256"), "kid")


def test_missing_subject_or_username_is_refused(
    api_client: TestClient, realm_forge_key: RealmForgeKey
) -> None:
    _refused(api_client, realm_forge_key.sign(realm_forge_key.claims(sub=None)), "'sub'")
    _refused(api_client,
             realm_forge_key.sign(realm_forge_key.claims(preferred_username=None)), "username")


def test_user_token_cannot_claim_to_be_an_access_body(
    api_client: TestClient, realm_forge_key: RealmForgeKey
) -> None:
    token = realm_forge_key.sign(realm_forge_key.claims(access_body="hdab-alpha"))
    body = api_client.get("/v1/me", headers=bearer(token)).json()
    assert body["kind"] == "user" and body["access_body"] is None


@pytest.mark.parametrize("count", [200])
def test_unknown_kid_flood_does_not_hammer_keycloak(keycloak_url: str, count: int) -> None:
    cache = JWKSCache(f"{keycloak_url}/realms/spe/protocol/openid-connect/certs",
                      min_refresh_seconds=60)
    for i in range(count):
        assert cache.key(f"bogus-{i}") is None
    assert cache.fetches == 1
