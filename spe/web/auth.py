"""Console login through Keycloak (authorisation code with PKCE) and server-side sessions.

Contract
--------
* :func:`begin_login` stores a ``login`` row (PKCE verifier, state, nonce, the page to return
  to) under a fresh random token (sent as a short-lived cookie) and returns Keycloak's
  authorisation URL (``code_challenge_method=S256``).
* :func:`finish_login` checks the callback's ``state`` against that row (one use: the row is
  deleted), exchanges the code with the verifier and the console client's secret, validates the
  access token with the API's own Keycloak validator (issuer, audience, signature) and the ID
  token's nonce, and stores a ``user`` row holding the person's principal. It returns the new
  session token (the cookie) and the page to return to.
* An access-body officer (realm role ``access-body`` and exactly one group under
  ``/access-bodies/``) acts for that access body: their principal is the access body's
  (``kind`` ``service``, ``access_body`` set), named by the officer's username, so the permit
  policy and the audit log treat the act as the access body's, done by that person.
* :func:`load` returns the live session (expired rows are deleted; every new login also
  deletes all expired rows, so abandoned logins do not pile up); :func:`end` deletes it and
  returns Keycloak's end-session URL (``id_token_hint``), so logout ends the Keycloak session too.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
from sqlalchemy import delete

from spe.api.state import AppState
from spe.auth.keycloak_tokens import principal_from_claims, realm_issuer
from spe.auth.principal import Principal, Role
from spe.auth.validator import get_validator
from spe.config import DEV_CONSOLE_CLIENT_SECRET, Settings
from spe.errors import NotAuthenticated
from spe.web.models import WebSession

ACCESS_BODY_GROUP = "/access-bodies/"
LOGIN_SECONDS = 600


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _oidc(settings: Settings, endpoint: str) -> str:
    return f"{realm_issuer(settings)}/protocol/openid-connect/{endpoint}"


def redirect_uri(settings: Settings) -> str:
    return f"{settings.api_base_url.rstrip('/')}/console/callback"


def logged_out_uri(settings: Settings) -> str:
    return f"{settings.api_base_url.rstrip('/')}/console/logged-out"


@dataclass(frozen=True)
class ConsoleSession:
    token_hash: str
    csrf: str
    principal: Principal
    id_token: str


def _check_configured(settings: Settings) -> None:
    if settings.profile != "dev" and \
            settings.console_client_secret.get_secret_value() == DEV_CONSOLE_CLIENT_SECRET:
        raise NotAuthenticated("The console is not configured: set console_client_secret.")


def begin_login(state: AppState, next_path: str) -> tuple[str, str]:
    """(login cookie token, Keycloak authorisation URL)."""
    settings = state.settings
    _check_configured(settings)
    token, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(48)
    oauth_state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    now = _now()
    with state.db.write() as s:
        # expired rows (abandoned logins, old sessions) go here, by the expiry index
        s.execute(delete(WebSession).where(WebSession.expires_at < now))
        s.add(WebSession(id=_hash(token), kind="login", csrf=secrets.token_urlsafe(32),
                         created_at=now, expires_at=now + timedelta(seconds=LOGIN_SECONDS),
                         data={"verifier": verifier, "state": oauth_state, "nonce": nonce,
                               "next": next_path}))
    query = urlencode({"client_id": settings.console_client_id, "response_type": "code",
                       "scope": "openid", "redirect_uri": redirect_uri(settings),
                       "state": oauth_state, "nonce": nonce, "code_challenge": challenge,
                       "code_challenge_method": "S256"})
    return token, f"{_oidc(settings, 'auth')}?{query}"


def _principal(claims: dict[str, Any]) -> Principal:
    person = principal_from_claims(claims)
    if person.kind != "user":
        raise NotAuthenticated("The console is for people, not clients.")
    if Role.ACCESS_BODY not in person.roles:
        return person
    groups = claims.get("spe_groups")
    bodies = sorted({g[len(ACCESS_BODY_GROUP):] for g in groups or []
                     if isinstance(g, str) and g.startswith(ACCESS_BODY_GROUP)
                     and "/" not in g[len(ACCESS_BODY_GROUP):]})
    if len(bodies) != 1:
        raise NotAuthenticated("An access-body officer must belong to exactly one access body.")
    return Principal(subject=person.subject, username=person.username, kind="service",
                     roles=person.roles, access_body=bodies[0], token_id=person.token_id)


def finish_login(state: AppState, login_token: str | None, code: str | None,
                 oauth_state: str | None) -> tuple[str, ConsoleSession, str]:
    """(session cookie token, the session, the page to return to); NotAuthenticated on any
    mismatch (the reason never echoes what was sent)."""
    settings = state.settings
    if not login_token or not code or not oauth_state:
        raise NotAuthenticated("The login did not complete; start again.")
    with state.db.write() as s:
        row = s.get(WebSession, _hash(login_token))
        if row is not None:
            s.delete(row)
    if row is None or row.kind != "login" or row.expires_at < _now() or \
            not secrets.compare_digest(row.data["state"], oauth_state):
        raise NotAuthenticated("The login did not complete; start again.")
    try:
        response = httpx.post(_oidc(settings, "token"), timeout=30, data={
            "grant_type": "authorization_code", "code": code,
            "redirect_uri": redirect_uri(settings), "code_verifier": row.data["verifier"],
            "client_id": settings.console_client_id,
            "client_secret": settings.console_client_secret.get_secret_value()})
    except httpx.HTTPError as exc:
        raise NotAuthenticated("Keycloak could not be reached; try again.") from exc
    if response.status_code != 200:
        raise NotAuthenticated("Keycloak refused the login; start again.")
    body = response.json()
    validator = get_validator(state)
    claims = _verify(validator, str(body.get("access_token", "")))
    id_token = str(body.get("id_token", ""))
    id_claims = jwt.decode(id_token, options={"verify_signature": False}) if id_token else {}
    if id_claims.get("nonce") != row.data["nonce"] or id_claims.get("sub") != claims.get("sub"):
        raise NotAuthenticated("The login did not complete; start again.")
    principal = _principal(claims)
    token = secrets.token_urlsafe(32)
    now = _now()
    session = WebSession(
        id=_hash(token), kind="user", csrf=secrets.token_urlsafe(32), created_at=now,
        expires_at=now + timedelta(seconds=settings.console_session_seconds),
        data={"principal": {"subject": principal.subject, "username": principal.username,
                            "kind": principal.kind,
                            "roles": sorted(r.value for r in principal.roles),
                            "access_body": principal.access_body},
              "id_token": id_token})
    with state.db.write() as s:
        s.add(session)
    return token, ConsoleSession(session.id, session.csrf, principal, id_token), \
        str(row.data["next"])


def _verify(validator: Any, token: str) -> dict[str, Any]:
    keycloak = getattr(validator, "keycloak", None)
    verify = getattr(keycloak, "verify", None)
    if verify is None:
        raise NotAuthenticated("The console needs the Keycloak token validator.")
    claims: dict[str, Any] = verify(token)
    return claims


def load(state: AppState, token: str | None) -> ConsoleSession | None:
    if not token:
        return None
    key = _hash(token)
    with state.db.read() as s:
        row = s.get(WebSession, key)
        data = dict(row.data) if row is not None else None
        kind, csrf, expires = (row.kind, row.csrf, row.expires_at) if row else ("", "", _now())
    if data is None or kind != "user":
        return None
    if expires < _now():
        with state.db.write() as s:
            stale = s.get(WebSession, key)
            if stale is not None:
                s.delete(stale)
        return None
    p = data["principal"]
    principal = Principal(subject=p["subject"], username=p["username"], kind=p["kind"],
                          roles=frozenset(Role(r) for r in p["roles"]),
                          access_body=p.get("access_body"))
    return ConsoleSession(key, csrf, principal, str(data.get("id_token", "")))


def end(state: AppState, session: ConsoleSession) -> str:
    """Delete the session; Keycloak's end-session URL that returns to the logged-out page."""
    with state.db.write() as s:
        row = s.get(WebSession, session.token_hash)
        if row is not None:
            s.delete(row)
    query = {"client_id": state.settings.console_client_id,
             "post_logout_redirect_uri": logged_out_uri(state.settings)}
    if session.id_token:
        query["id_token_hint"] = session.id_token
    return f"{_oidc(state.settings, 'logout')}?{urlencode(query)}"
