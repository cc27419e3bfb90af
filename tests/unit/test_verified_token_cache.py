"""The Keycloak validator's verified-token cache never outlives a token's ``exp``, forgets a
token whose signing key the realm stops publishing, and never accepts what verification
refuses. The realm's keys are a local EC key served by a stub JWKS (a real Keycloak cannot
issue a token that expires within a test's seconds)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from spe.auth.jwks import RealmKey
from spe.auth.keycloak_tokens import KeycloakTokenValidator, realm_issuer
from spe.config import Settings
from spe.errors import NotAuthenticated


class _StubJWKS:
    def __init__(self, key: RealmKey) -> None:
        self.keys = {key.kid: key}

    def key(self, kid: str) -> RealmKey | None:
        return self.keys.get(kid)


@pytest.fixture
def realm() -> tuple[KeycloakTokenValidator, Any, _StubJWKS]:
    private = ec.generate_private_key(ec.SECP256R1())
    jwks = _StubJWKS(RealmKey("k1", "ES256", private.public_key()))
    settings = Settings(profile="dev", token_leeway_seconds=0)
    validator = KeycloakTokenValidator(settings, jwks=jwks)  # type: ignore[arg-type]
    return validator, private, jwks


def _token(validator: KeycloakTokenValidator, private: Any, exp: float) -> str:
    now = int(time.time())
    claims = {"iss": validator.issuer, "aud": validator.audience, "sub": "u1", "iat": now,
              "exp": exp, "typ": "Bearer", "preferred_username": "alice",
              "realm_access": {"roles": ["researcher"]}}
    return jwt.encode(claims, private, algorithm="ES256", headers={"kid": "k1"})


def test_cached_token_is_refused_after_its_exp(
    realm: tuple[KeycloakTokenValidator, Any, _StubJWKS],
) -> None:
    validator, private, _ = realm
    exp = int(time.time()) + 2
    token = _token(validator, private, exp=exp)
    assert validator.validate(token).username == "alice"
    assert validator.validate(token).username == "alice"  # served from the cache
    time.sleep(max(0.0, exp - time.time()) + 0.1)  # past exp, well within the cache's TTL
    with pytest.raises(NotAuthenticated):
        validator.validate(token)


def test_cache_entry_dies_with_its_signing_key(
    realm: tuple[KeycloakTokenValidator, Any, _StubJWKS],
) -> None:
    validator, private, jwks = realm
    token = _token(validator, private, exp=int(time.time()) + 300)
    validator.validate(token)
    jwks.keys.clear()  # the realm rotated the key out
    with pytest.raises(NotAuthenticated):
        validator.validate(token)


def test_refused_token_is_never_cached(
    realm: tuple[KeycloakTokenValidator, Any, _StubJWKS],
) -> None:
    validator, private, _ = realm
    other = ec.generate_private_key(ec.SECP256R1())
    forged = _token(validator, other, exp=int(time.time()) + 300)
    for _ in range(2):
        with pytest.raises(NotAuthenticated):
            validator.validate(forged)
    assert validator.validate(_token(validator, private, exp=int(time.time()) + 300))
    assert realm_issuer(Settings(profile="dev")) == validator.issuer
