"""The JWKS parser keeps only asymmetric signature keys, each bound to one algorithm, so a
symmetric or encryption key published by mistake can never verify a token."""

from __future__ import annotations

import json

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from spe.auth.jwks import _parse


def _jwk(key: object, **extra: str) -> dict[str, str]:
    algo = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPublicKey) \
        else jwt.algorithms.ECAlgorithm
    return {**json.loads(algo.to_jwk(key)), **extra}


def test_only_asymmetric_signing_keys_are_kept() -> None:
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    document = {"keys": [
        _jwk(rsa_pub, kid="rsa-sig", alg="RS256", use="sig"),
        _jwk(rsa_pub, kid="rsa-enc", alg="RSA-OAEP", use="enc"),
        _jwk(ec_pub, kid="ec-noalg"),
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"},
        {"kty": "RSA", "kid": "claims-none", "alg": "none", "n": "AQAB", "e": "AQAB"},
        {"kid": "garbage"},
        "not-a-key",
    ]}
    keys = _parse(document)
    assert set(keys) == {"rsa-sig", "ec-noalg"}
    assert keys["rsa-sig"].algorithm == "RS256"
    assert keys["ec-noalg"].algorithm == "ES256"
