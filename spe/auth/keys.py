"""The SPE's own signing keys for workspace tokens (Ed25519, rotatable).

Contract:

* Keys live in ``auth_signing_keys``; the private half is PKCS#8 PEM encrypted with a key
  derived (HKDF-SHA256) from ``settings.secret_key``.
* :func:`rotate_signing_key` creates a new key that signs from now on; older keys keep
  verifying until every token they signed has expired (``retire_at``), then stop.
* :class:`KeyRing` caches keys in memory: ``signing_key(session)`` returns the newest active
  key (creating the first one on demand), ``public_key(session, kid)`` a verification key or
  None (an unknown kid costs one primary-key lookup; known keys are served from memory).
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from spe.audit import AuditEvent, record
from spe.auth.models import SigningKey
from spe.auth.principal import SYSTEM, Principal
from spe.config import Settings
from spe.db.base import utcnow

ALGORITHM = "EdDSA"
KID_PREFIX = "spe-ws-"
#: How long a cached verification key is trusted before its retirement is re-read.
RECHECK_SECONDS = 30.0


def _wrapping_password(settings: Settings) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"spe-auth-keys",
                info=b"workspace token signing keys")
    derived = hkdf.derive(settings.secret_key.get_secret_value().encode())
    return base64.urlsafe_b64encode(derived)


@dataclass(frozen=True)
class LoadedKey:
    kid: str
    public: Ed25519PublicKey
    retire_at: datetime | None
    loaded: float = 0.0

    def usable(self, now: datetime) -> bool:
        return self.retire_at is None or self.retire_at > now


def rotate_signing_key(session: Session, settings: Settings, *,
                       actor: Principal = SYSTEM, retire_previous_now: bool = False) -> str:
    """Create a new signing key; schedule the retirement of the older ones. Returns its kid.

    Older keys keep verifying until the tokens they signed have expired, or, with
    ``retire_previous_now`` (a suspected key compromise), stop within ``RECHECK_SECONDS``.
    """
    now = utcnow()
    retire = now if retire_previous_now else now + timedelta(
        seconds=settings.workspace_token_ttl_seconds + settings.token_leeway_seconds + 60)
    live = select(SigningKey).where(or_(SigningKey.retire_at.is_(None),
                                        SigningKey.retire_at > retire))
    for old in session.scalars(live):
        old.retire_at = retire
    private = Ed25519PrivateKey.generate()
    kid = KID_PREFIX + secrets.token_hex(8)
    session.add(SigningKey(
        kid=kid,
        algorithm=ALGORITHM,
        public_key_pem=private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        private_key_enc=private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(_wrapping_password(settings)),
        ),
        created_at=now,
        retire_at=None,
    ))
    session.flush()
    if retire_previous_now:
        for ring in list(_keyrings.values()):
            ring.forget()
    record(session, AuditEvent(action="auth.key_rotate", actor=actor.actor,
                               role=actor.primary_role(), target=kid,
                               details={"algorithm": ALGORITHM,
                                        "retire_previous_now": retire_previous_now}))
    return kid


class KeyRing:
    """In-memory cache of the signing keys of one database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._public: dict[str, LoadedKey] = {}
        self._signing: tuple[str, Ed25519PrivateKey] | None = None

    def signing_key(self, session: Session) -> tuple[str, Ed25519PrivateKey]:
        """The newest active key (kid, private key), creating the first key when none exists."""
        row = session.scalars(
            select(SigningKey).where(SigningKey.retire_at.is_(None))
            .order_by(SigningKey.created_at.desc()).limit(1)
        ).first()
        if row is None:
            rotate_signing_key(session, self.settings)
            return self.signing_key(session)
        cached = self._signing
        if cached is not None and cached[0] == row.kid:
            return cached
        private = serialization.load_pem_private_key(
            row.private_key_enc, password=_wrapping_password(self.settings))
        if not isinstance(private, Ed25519PrivateKey):
            raise RuntimeError(f"signing key {row.kid} is not an Ed25519 key")
        self._signing = (row.kid, private)
        return self._signing

    def public_key(self, session: Session, kid: str) -> Ed25519PublicKey | None:
        """The verification key for ``kid`` while it is not retired, else None."""
        found = self._public.get(kid)
        if found is None or time.monotonic() - found.loaded > RECHECK_SECONDS:
            row = session.get(SigningKey, kid)
            if row is None:
                return None
            public = serialization.load_pem_public_key(row.public_key_pem.encode())
            if not isinstance(public, Ed25519PublicKey):
                return None
            found = LoadedKey(row.kid, public, row.retire_at, time.monotonic())
            with self._lock:
                self._public[kid] = found
        if not found.usable(utcnow()):
            return None
        return found.public

    def forget(self) -> None:
        """Drop cached keys (after a rotation in another process, for instance)."""
        with self._lock:
            self._public = {}
            self._signing = None


_keyrings: dict[str, KeyRing] = {}


def keyring_for(settings: Settings, db_url: str) -> KeyRing:
    """One KeyRing per database in this process (minting and validation share cached keys)."""
    ring = _keyrings.get(db_url)
    if ring is None or ring.settings.secret_key != settings.secret_key:
        ring = KeyRing(settings)
        _keyrings[db_url] = ring
    return ring
