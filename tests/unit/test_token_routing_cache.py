"""``SPETokenValidator`` answers a Keycloak token from the verified cache before routing
(skipping the routing hint's unverified decode), and that changes no decision: a token that
claims the workspace issuer is never answered from the cache, even signed with the realm's
key and sent after a cached Keycloak token; a cached token is refused once past its ``exp``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from spe.auth.jwks import RealmKey
from spe.auth.keycloak_tokens import KeycloakTokenValidator
from spe.auth.validator import SPETokenValidator
from spe.auth.workspace_tokens import WORKSPACE_ISSUER
from spe.config import Settings
from spe.db import Database
from spe.errors import NotAuthenticated


class _StubJWKS:
    def __init__(self, key: RealmKey) -> None:
        self.keys = {key.kid: key}

    def key(self, kid: str) -> RealmKey | None:
        return self.keys.get(kid)


def _token(private: Any, issuer: str, audience: str, exp: float) -> str:
    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, "sub": "u1", "iat": now, "nbf": now,
              "exp": exp, "typ": "Bearer", "preferred_username": "alice", "jti": "j1",
              "realm_access": {"roles": ["researcher"]}}
    return jwt.encode(claims, private, algorithm="ES256", headers={"kid": "k1"})


@pytest.fixture
def validator(tmp_path: Path) -> tuple[SPETokenValidator, Any]:
    private = ec.generate_private_key(ec.SECP256R1())
    settings = Settings(profile="dev", token_leeway_seconds=0, data_dir=tmp_path / "var")
    db = Database(f"sqlite:///{tmp_path / 'control.db'}")
    db.upgrade()
    v = SPETokenValidator(settings, db)
    v.keycloak = KeycloakTokenValidator(
        settings, jwks=_StubJWKS(RealmKey("k1", "ES256", private.public_key())))  # type: ignore[arg-type]
    return v, private


def test_cached_keycloak_token_is_answered_before_routing(
    validator: tuple[SPETokenValidator, Any],
) -> None:
    v, private = validator
    exp = int(time.time()) + 2
    token = _token(private, v.keycloak.issuer, v.keycloak.audience, exp)
    assert v.keycloak.cached(token) is None
    first = v.validate(token)
    assert first.username == "alice" and first.kind == "user"
    assert v.keycloak.cached(token) is first
    assert v.validate(token) is first  # from the cache
    time.sleep(max(0.0, exp - time.time()) + 0.1)
    assert v.keycloak.cached(token) is None
    with pytest.raises(NotAuthenticated):
        v.validate(token)


def test_workspace_issuer_is_never_served_from_the_cache(
    validator: tuple[SPETokenValidator, Any],
) -> None:
    v, private = validator
    good = _token(private, v.keycloak.issuer, v.keycloak.audience, time.time() + 60)
    v.validate(good)
    forged = _token(private, WORKSPACE_ISSUER, v.keycloak.audience, time.time() + 60)
    for _ in range(2):
        with pytest.raises(NotAuthenticated):
            v.validate(forged)
        assert v.keycloak.cached(forged) is None
