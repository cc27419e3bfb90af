"""The realm's signing keys, fetched from Keycloak's JWKS endpoint and cached.

Contract:

* ``JWKSCache(url).key(kid)`` returns the verification key for ``kid`` as a :class:`RealmKey`
  (the public key object and the one algorithm it may be used with), or ``None`` when the
  realm does not publish that ``kid``.
* Keys are fetched on first use. An unknown ``kid`` triggers a refetch, but at most once every
  ``min_refresh_seconds`` (so a flood of forged ``kid`` values cannot hammer Keycloak); the
  whole set is also refreshed after ``max_age_seconds``. Lookups of known keys never do I/O.
* Only asymmetric signature keys are kept (``use`` absent or ``sig``; RSA, EC or OKP). Each key
  is bound to the algorithm the JWKS publishes for it, or to RS256 / the curve's ES algorithm /
  EdDSA when the JWKS names none. HMAC and ``none`` are never accepted.
* When Keycloak cannot be reached and no keys are cached, :class:`spe.errors.ServiceUnavailable`
  is raised (503): the token may be fine, the SPE just cannot check it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from spe.errors import ServiceUnavailable

#: Asymmetric JWS algorithms the SPE can verify. HS* and "none" are deliberately absent.
ASYMMETRIC_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
})

_DEFAULT_ALG = {"RSA": "RS256", "OKP": "EdDSA"}
_EC_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


@dataclass(frozen=True)
class RealmKey:
    kid: str
    algorithm: str
    key: Any  # a cryptography public key object


def _parse(document: dict[str, Any]) -> dict[str, RealmKey]:
    keys: dict[str, RealmKey] = {}
    for jwk in document.get("keys", []):
        if not isinstance(jwk, dict):
            continue
        kid, kty, use = jwk.get("kid"), jwk.get("kty"), jwk.get("use", "sig")
        if not isinstance(kid, str) or use != "sig" or kty not in ("RSA", "EC", "OKP"):
            continue
        alg = jwk.get("alg") or (_EC_ALG.get(jwk.get("crv", "")) if kty == "EC"
                                 else _DEFAULT_ALG.get(kty))
        if alg not in ASYMMETRIC_ALGORITHMS:
            continue
        try:
            parsed = PyJWK.from_json(json.dumps(jwk), algorithm=alg)
        except PyJWKError:
            continue
        keys[kid] = RealmKey(kid=kid, algorithm=alg, key=parsed.key)
    return keys


class JWKSCache:
    """Thread-safe cache of one JWKS document."""

    def __init__(
        self,
        url: str,
        *,
        min_refresh_seconds: float = 10.0,
        max_age_seconds: float = 3600.0,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.min_refresh_seconds = min_refresh_seconds
        self.max_age_seconds = max_age_seconds
        self.timeout_seconds = timeout_seconds
        self._keys: dict[str, RealmKey] = {}
        self._fetched_at: float | None = None
        self._lock = threading.Lock()
        self.fetches = 0

    def key(self, kid: str) -> RealmKey | None:
        """The key for ``kid``, refreshing (rate-limited) when it is unknown or the set is old."""
        now = time.monotonic()
        fetched = self._fetched_at
        found = self._keys.get(kid)
        if found is not None and fetched is not None and now - fetched < self.max_age_seconds:
            return found
        with self._lock:
            fetched = self._fetched_at
            stale = fetched is None or now - fetched >= self.max_age_seconds
            may_refresh = fetched is None or now - fetched >= self.min_refresh_seconds
            if (kid not in self._keys and may_refresh) or stale:
                self._refresh()
            return self._keys.get(kid)

    def algorithms(self) -> frozenset[str]:
        """The algorithms of the keys currently cached."""
        return frozenset(k.algorithm for k in self._keys.values())

    def _refresh(self) -> None:
        try:
            response = httpx.get(self.url, timeout=self.timeout_seconds)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            if self._keys:
                # Keep serving the cached keys; try again after min_refresh_seconds.
                self._fetched_at = time.monotonic() - self.max_age_seconds \
                    + self.min_refresh_seconds
                return
            raise ServiceUnavailable(
                "The identity provider's signing keys cannot be fetched right now, so the "
                "token cannot be checked; try again shortly."
            ) from exc
        self._keys = _parse(document)
        self._fetched_at = time.monotonic()
        self.fetches += 1
