"""Workspace tokens: short-lived SPE tokens bound to (person, permit, workspace).

Researchers' code never holds a Keycloak token; the workspace gets one of these instead.

Contract:

* :func:`mint_workspace_token` (in the caller's write transaction) checks that the permit is
  active (via the registered permit checker, see :mod:`spe.auth.permit_checks`), signs an
  EdDSA JWT with the newest SPE key (``iss`` = :data:`WORKSPACE_ISSUER`, ``aud`` =
  ``settings.api_audience``, lifetime ``settings.workspace_token_ttl_seconds`` or less),
  records a grant row and audits ``auth.workspace_token_mint``. Given an ``address`` (the
  workspace's network address; the spawner always gives one), the signed claims carry it
  (``addr``) and the API accepts the token only from that client address
  (:func:`spe.auth.deps.get_principal`): a token copied out of the workspace is refused.
  A running workspace gets a fresh token before the old one expires
  (:mod:`workspaces.token_refresh`); the client reads the newest one on every request.
* :class:`WorkspaceTokenValidator` accepts a token only when the signature verifies with an
  unretired SPE key, the standard claims hold (with ``token_leeway_seconds``), its lifetime does
  not exceed the configured TTL, its grant exists, is unrevoked and unexpired and matches the
  claims, AND the permit checker says the permit is active right now (none registered: refused).
  The principal is ``kind="workspace"`` with the researcher role only.
* :func:`revoke_workspace_tokens` (workspace stopped) and :func:`revoke_permit_tokens` (permit
  suspended, revoked or expired) revoke every live grant at once and audit it;
  :func:`revoke_person_tokens` (persons removed from a permit) revokes theirs; validation reads
  the grant on every request, so revocation takes effect on the next request.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from jwt import exceptions as jwt_errors
from sqlalchemy import update
from sqlalchemy.orm import Session

from spe.audit import AuditEvent, Outcome, record
from spe.auth.keycloak_tokens import describe_jwt_error, unverified_header
from spe.auth.keys import ALGORITHM, KeyRing, keyring_for
from spe.auth.models import WorkspaceGrant
from spe.auth.permit_checks import PermitChecker, get_permit_checker
from spe.auth.principal import SYSTEM, Principal, Role
from spe.config import Settings
from spe.db import Database
from spe.db.base import utcnow
from spe.errors import Forbidden, InvalidInput, NotAuthenticated

WORKSPACE_ISSUER = "urn:spe:workspace-token"
TOKEN_TYPE = "spe-workspace+jwt"  # noqa: S105 - a JWT "typ", not a secret

@dataclass(frozen=True)
class MintedToken:
    token: str
    jti: str
    expires_at: datetime
    kid: str


def mint_workspace_token(
    session: Session,
    settings: Settings,
    *,
    subject: str,
    username: str,
    permit_id: str,
    workspace_id: str,
    actor: Principal = SYSTEM,
    ttl_seconds: int | None = None,
    checker: PermitChecker | None = None,
    keyring: KeyRing | None = None,
    address: str | None = None,
) -> MintedToken:
    """Mint and record a workspace token (call inside ``db.write()``); bound to the client
    ``address`` when one is given."""
    for name, value in (("subject", subject), ("username", username),
                        ("permit_id", permit_id), ("workspace_id", workspace_id)):
        if not value or len(value) > (64 if name == "permit_id" else 128):
            raise InvalidInput(f"A workspace token needs a non-empty {name} of sane length.")
    if address is not None:
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError as exc:
            raise InvalidInput("A workspace token's address must be an IP address.") from exc
    ttl = settings.workspace_token_ttl_seconds if ttl_seconds is None else ttl_seconds
    if not 1 <= ttl <= settings.workspace_token_ttl_seconds:
        raise InvalidInput(
            f"Workspace token lifetime must be 1..{settings.workspace_token_ttl_seconds} s."
        )
    check = checker or get_permit_checker()
    if check is None or not check(session, permit_id):
        record(session, AuditEvent(
            action="auth.workspace_token_mint", actor=actor.actor, role=actor.primary_role(),
            permit_id=permit_id, target=workspace_id, outcome=Outcome.REFUSED,
            reason="permit not active" if check else "no permit checker registered",
            details={"username": username}))
        raise Forbidden(f"Permit {permit_id} is not active: no workspace token is issued.")
    ring = keyring or keyring_for(
        settings, session.get_bind().engine.url.render_as_string(hide_password=False))
    kid, private = ring.signing_key(session)
    now = utcnow()
    expires = now + timedelta(seconds=ttl)
    jti = secrets.token_urlsafe(24)
    claims = {
        "iss": WORKSPACE_ISSUER,
        "aud": settings.api_audience,
        "sub": subject,
        "preferred_username": username,
        "permit_id": permit_id,
        "workspace_id": workspace_id,
        "jti": jti,
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()),
        "exp": int(expires.timestamp()),
    }
    if address is not None:
        claims["addr"] = address
    token = jwt.encode(claims, private, algorithm=ALGORITHM,
                       headers={"kid": kid, "typ": TOKEN_TYPE})
    session.add(WorkspaceGrant(jti=jti, subject=subject, username=username, permit_id=permit_id,
                               workspace_id=workspace_id, kid=kid, issued_at=now,
                               expires_at=expires))
    record(session, AuditEvent(
        action="auth.workspace_token_mint", actor=actor.actor, role=actor.primary_role(),
        permit_id=permit_id, target=workspace_id,
        details={"username": username, "jti": jti, "kid": kid, "ttl_seconds": ttl,
                 "bound_address": address}))
    return MintedToken(token=token, jti=jti, expires_at=expires, kid=kid)


def _revoke(session: Session, column: Any, value: str, *, action: str, actor: Principal,
            reason: str, permit_id: str | None) -> int:
    now = utcnow()
    result = session.execute(
        update(WorkspaceGrant)
        .where(column == value, WorkspaceGrant.revoked_at.is_(None),
               WorkspaceGrant.expires_at > now)
        .values(revoked_at=now, revoked_reason=reason[:255])
    )
    count = int(getattr(result, "rowcount", 0) or 0)
    record(session, AuditEvent(action=action, actor=actor.actor, role=actor.primary_role(),
                               permit_id=permit_id, target=value, reason=reason,
                               details={"revoked_tokens": count}))
    return count


def revoke_workspace_tokens(session: Session, workspace_id: str, *, actor: Principal = SYSTEM,
                            reason: str = "workspace stopped") -> int:
    """Revoke every live token of a workspace (call when it stops). Returns how many."""
    return _revoke(session, WorkspaceGrant.workspace_id, workspace_id,
                   action="auth.workspace_tokens_revoke", actor=actor, reason=reason,
                   permit_id=None)


def revoke_permit_tokens(session: Session, permit_id: str, *, actor: Principal = SYSTEM,
                         reason: str = "permit no longer active") -> int:
    """Revoke every live workspace token of a permit (suspension, revocation, expiry)."""
    return _revoke(session, WorkspaceGrant.permit_id, permit_id,
                   action="auth.permit_tokens_revoke", actor=actor, reason=reason,
                   permit_id=permit_id)


def revoke_person_tokens(session: Session, permit_id: str, usernames: Iterable[str], *,
                         actor: Principal = SYSTEM,
                         reason: str = "person no longer named in the permit") -> int:
    """Revoke the live tokens of ``usernames`` under ``permit_id`` (persons removed from the
    permit by an amendment). Audited when any token was live. Returns how many."""
    names = sorted(set(usernames))
    if not names:
        return 0
    now = utcnow()
    result = session.execute(
        update(WorkspaceGrant)
        .where(WorkspaceGrant.permit_id == permit_id, WorkspaceGrant.username.in_(names),
               WorkspaceGrant.revoked_at.is_(None), WorkspaceGrant.expires_at > now)
        .values(revoked_at=now, revoked_reason=reason[:255])
    )
    count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        record(session, AuditEvent(action="auth.person_tokens_revoke", actor=actor.actor,
                                   role=actor.primary_role(), permit_id=permit_id,
                                   target=permit_id, reason=reason,
                                   details={"usernames": names, "revoked_tokens": count}))
    return count


def is_workspace_token(token: str) -> bool:
    """Whether ``token`` claims to be a workspace token (unverified routing hint only)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt_errors.PyJWTError:
        return False
    return claims.get("iss") == WORKSPACE_ISSUER


class WorkspaceTokenValidator:
    """Validates workspace tokens against the SPE keys, the grants table and permit status."""

    _REQUIRED = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]

    def __init__(self, settings: Settings, db: Database,
                 extras: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.db = db
        self.extras = extras
        self.keyring = keyring_for(settings, db.url)

    def validate(self, token: str) -> Principal:
        header = unverified_header(token)
        if header.get("alg") != ALGORITHM:
            raise NotAuthenticated(f"Workspace tokens must be signed with {ALGORITHM}.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise NotAuthenticated("The token header has no key id (kid).")
        with self.db.read() as session:
            public = self.keyring.public_key(session, kid)
            if public is None:
                raise NotAuthenticated(
                    "The workspace token is signed with an unknown or retired SPE key."
                )
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, public, algorithms=[ALGORITHM], audience=self.settings.api_audience,
                    issuer=WORKSPACE_ISSUER, leeway=self.settings.token_leeway_seconds,
                    options={"require": self._REQUIRED},
                )
            except jwt_errors.PyJWTError as exc:
                raise NotAuthenticated(describe_jwt_error(
                    exc, WORKSPACE_ISSUER, self.settings.api_audience)) from exc
            if int(claims["exp"]) - int(claims["iat"]) > self.settings.workspace_token_ttl_seconds:
                raise NotAuthenticated("The workspace token's lifetime exceeds the allowed TTL.")
            grant = session.get(WorkspaceGrant, str(claims["jti"]))
            if grant is None:
                raise NotAuthenticated("The workspace token was not issued by this SPE.")
            if grant.revoked_at is not None:
                raise NotAuthenticated(
                    f"The workspace token was revoked ({grant.revoked_reason or 'revoked'})."
                )
            if grant.expires_at <= utcnow() - timedelta(seconds=self.settings.token_leeway_seconds):
                raise NotAuthenticated("The token has expired; obtain a new one.")
            bound = (grant.subject, grant.username, grant.permit_id, grant.workspace_id)
            claimed = (claims.get("sub"), claims.get("preferred_username"),
                       claims.get("permit_id"), claims.get("workspace_id"))
            if bound != claimed:
                raise NotAuthenticated("The workspace token does not match its grant.")
            checker = get_permit_checker(self.extras)
            if checker is None:
                raise NotAuthenticated(
                    "Workspace tokens cannot be checked: no permit checker is registered."
                )
            if not checker(session, grant.permit_id):
                raise NotAuthenticated(
                    f"Permit {grant.permit_id} is not active; its workspace tokens are refused."
                )
        return Principal(
            subject=grant.subject,
            username=grant.username,
            kind="workspace",
            roles=frozenset({Role.RESEARCHER}),
            permit_id=grant.permit_id,
            workspace_id=grant.workspace_id,
            token_id=grant.jti,
            address=str(claims["addr"]) if claims.get("addr") else None,
        )
