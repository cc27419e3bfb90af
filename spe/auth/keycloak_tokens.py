"""Validation of Keycloak access tokens for the SPE realm.

Contract of :meth:`KeycloakTokenValidator.validate` (returns a Principal or raises
:class:`spe.errors.NotAuthenticated`; messages say what is wrong and never contain the token):

* the JWS header names an asymmetric algorithm and a ``kid`` the realm publishes in its JWKS,
  and the algorithm is the one that key is published for (so ``alg: none`` and HS256 signed
  with the public key both fail);
* the signature verifies with that key;
* ``iss`` equals ``<keycloak_base_url>/realms/<realm>``, ``aud`` contains ``api_audience``,
  ``exp`` and ``nbf`` hold with ``token_leeway_seconds`` of leeway, ``typ`` is ``Bearer``
  (ID and refresh tokens are refused), ``sub`` is present;
* realm roles (``realm_access.roles``) become :class:`Role` values (unknown roles ignored).
  A client-credentials token (``preferred_username`` is ``service-account-<azp>``) becomes a
  ``service`` principal named by its client id, with ``access_body`` from the hard-coded
  ``access_body`` claim; any other token is a ``user`` principal named by
  ``preferred_username``.

Verified-token cache: a token that passed every check above is remembered by the SHA-256 of
its bytes (never the token itself) for at most ``VERIFIED_TTL_SECONDS`` and never past its
``exp`` (no leeway), and only while the realm still publishes its ``kid``; a hit skips the
signature check and returns the same Principal. Keycloak tokens carry no server-side
revocation state here (revocation and suspension are permit checks, made per request after
authentication), so the cache changes no decision; workspace tokens are not cached.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import jwt
from jwt import exceptions as jwt_errors

from spe.auth.jwks import ASYMMETRIC_ALGORITHMS, JWKSCache
from spe.auth.principal import Principal, Role
from spe.config import Settings
from spe.errors import NotAuthenticated

_ROLE_VALUES = {r.value: r for r in Role}

VERIFIED_TTL_SECONDS = 60.0
VERIFIED_MAX_ENTRIES = 4096


def realm_issuer(settings: Settings) -> str:
    return f"{settings.keycloak_base_url.rstrip('/')}/realms/{settings.keycloak_realm}"


def jwks_url(settings: Settings) -> str:
    return f"{realm_issuer(settings)}/protocol/openid-connect/certs"


def unverified_header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt_errors.DecodeError as exc:
        raise NotAuthenticated("The bearer token is not a well-formed JWT.") from exc


class KeycloakTokenValidator:
    """Validates access tokens of one Keycloak realm against its cached JWKS."""

    def __init__(self, settings: Settings, jwks: JWKSCache | None = None) -> None:
        self.issuer = realm_issuer(settings)
        self.audience = settings.api_audience
        self.leeway = settings.token_leeway_seconds
        self.jwks = jwks or JWKSCache(jwks_url(settings))
        self._verified: dict[bytes, tuple[float, str, Principal]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> Principal | None:
        """The Principal of ``token`` if it passed :meth:`verify` within the cache's bounds
        (see the module docstring), else None (an expired entry is dropped)."""
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            hit = self._verified.get(digest)
        if hit is None:
            return None
        until, kid, principal = hit
        if time.time() < until and self.jwks.key(kid) is not None:
            return principal
        with self._lock:
            self._verified.pop(digest, None)
        return None

    def validate(self, token: str) -> Principal:
        hit = self.cached(token)
        if hit is not None:
            return hit
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()
        claims = self.verify(token)
        principal = principal_from_claims(claims)
        exp = claims.get("exp")
        key_id = unverified_header(token).get("kid")
        if isinstance(exp, int | float) and isinstance(key_id, str):
            until = min(float(exp), now + VERIFIED_TTL_SECONDS)
            with self._lock:
                if len(self._verified) >= VERIFIED_MAX_ENTRIES:
                    self._verified.pop(next(iter(self._verified)))
                self._verified[digest] = (until, key_id, principal)
        return principal

    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token`` (NotAuthenticated on any failure)."""
        header = unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise NotAuthenticated(
                f"Token algorithm {str(alg)[:16]!r} is not accepted; tokens must be signed by "
                "the realm's keys with an asymmetric algorithm."
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise NotAuthenticated("The token header has no key id (kid).")
        key = self.jwks.key(kid)
        if key is None:
            raise NotAuthenticated(
                "The token is signed with a key the realm does not publish (unknown kid)."
            )
        if key.algorithm != alg:
            raise NotAuthenticated(
                f"The token's algorithm {alg} does not match its key, which is published "
                f"for {key.algorithm}."
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt_errors.PyJWTError as exc:
            raise NotAuthenticated(describe_jwt_error(exc, self.issuer, self.audience)) from exc
        if claims.get("typ", "Bearer") != "Bearer":
            raise NotAuthenticated("Only access tokens are accepted (not ID or refresh tokens).")
        return claims


def describe_jwt_error(exc: Exception, issuer: str, audience: str) -> str:
    """A message for the caller naming what failed, without any token content."""
    if isinstance(exc, jwt_errors.ExpiredSignatureError):
        return "The token has expired; obtain a new one."
    if isinstance(exc, jwt_errors.ImmatureSignatureError):
        return "The token is not yet valid (nbf/iat lies in the future)."
    if isinstance(exc, jwt_errors.InvalidAudienceError):
        return f"The token's audience does not include {audience!r}."
    if isinstance(exc, jwt_errors.InvalidIssuerError):
        return f"The token was not issued by {issuer}."
    if isinstance(exc, jwt_errors.MissingRequiredClaimError):
        return f"The token lacks the required claim {exc.claim!r}."
    if isinstance(exc, jwt_errors.InvalidSignatureError):
        return "The token's signature does not verify."
    if isinstance(exc, jwt_errors.InvalidAlgorithmError):
        return "The token's algorithm is not accepted."
    if isinstance(exc, jwt_errors.DecodeError):
        return "The bearer token is not a well-formed JWT."
    return "The token is not valid."


def roles_from_claims(claims: dict[str, Any]) -> frozenset[Role]:
    realm_access = claims.get("realm_access")
    names = realm_access.get("roles", []) if isinstance(realm_access, dict) else []
    if not isinstance(names, list):
        return frozenset()
    return frozenset(_ROLE_VALUES[n] for n in names if isinstance(n, str) and n in _ROLE_VALUES)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    subject = str(claims["sub"])
    roles = roles_from_claims(claims)
    username = claims.get("preferred_username")
    azp = claims.get("azp") or claims.get("client_id")
    if isinstance(azp, str) and username == f"service-account-{azp}":
        body = claims.get("access_body")
        return Principal(
            subject=subject,
            username=azp,
            kind="service",
            roles=roles,
            access_body=body if isinstance(body, str) and body else None,
            token_id=_str_or_none(claims.get("jti")),
        )
    if not isinstance(username, str) or not username:
        raise NotAuthenticated("The token does not name the user (preferred_username).")
    return Principal(subject=subject, username=username, kind="user", roles=roles,
                     token_id=_str_or_none(claims.get("jti")))


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
