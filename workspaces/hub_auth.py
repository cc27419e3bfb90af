"""Hub login against Keycloak: only ``researcher`` principals, audited, logout ends the session.

:class:`SPEKeycloakAuthenticator` is oauthenticator's ``GenericOAuthenticator`` (authorization
code flow with PKCE S256, confidential client ``jupyterhub``) plus three rules:

* **Admission**: a user is admitted only when Keycloak's userinfo lists the realm role
  ``researcher`` (the realm's ``realm-roles-userinfo`` mapper on the ``jupyterhub`` client puts
  ``realm_access.roles`` into userinfo). Everyone else gets JupyterHub's 403 page. Every
  decision is audited (``hub.login``, success or refused). The same check runs again on every
  auth refresh (``auth_refresh_age``), so a researcher whose role is removed is logged out at
  the next refresh.
* **Logout** ends the Keycloak session too: the hub posts the user's refresh token to
  Keycloak's logout endpoint (back channel, client-authenticated), drops the stored auth state,
  then redirects the browser to Keycloak's end-session endpoint with ``id_token_hint`` (no
  confirmation page) and back to the hub's login page. Audited as ``hub.logout``.
* Tokens stay in the hub: auth state is encrypted (``JUPYTERHUB_CRYPT_KEY``) and is never
  passed to a spawner; workspaces get SPE workspace tokens (:mod:`workspaces.spawner`).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

import httpx
from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.oauth2 import OAuthLogoutHandler
from traitlets import Unicode

from spe.audit import AuditEvent, Outcome, record
from spe.config import get_settings

REQUIRED_ROLE = "researcher"


def roles_of(auth_model: dict[str, Any] | None, user_key: str = "oauth_user") -> set[str]:
    """Realm roles from the userinfo stored in ``auth_model['auth_state']``."""
    state = (auth_model or {}).get("auth_state") or {}
    info = state.get(user_key) or {}
    roles = (info.get("realm_access") or {}).get("roles") or info.get("roles") or []
    return {str(r) for r in roles} if isinstance(roles, list) else set()


def _audit(action: str, username: str, outcome: Outcome, reason: str | None = None,
           **details: Any) -> None:
    from workspaces.spawner import _db

    with _db(get_settings()).write() as session:
        record(session, AuditEvent(action=action, actor=username or "-", role="researcher",
                                   target=username or "-", outcome=outcome, reason=reason,
                                   details=details))


class SPELogoutHandler(OAuthLogoutHandler):
    """Ends the Keycloak session (back channel + end-session redirect) on hub logout."""

    _id_token: str | None = None

    async def handle_logout(self) -> None:
        await super().handle_logout()
        user = self.current_user
        if user is None:
            return
        auth: SPEKeycloakAuthenticator = self.authenticator
        state = await user.get_auth_state() or {}
        self._id_token = state.get("id_token")
        ended = await auth.end_keycloak_session(state.get("refresh_token"))
        await user.save_auth_state(None)
        await asyncio.to_thread(_audit, "hub.logout", user.name, Outcome.SUCCESS,
                                keycloak_session_ended=ended)

    async def render_logout_page(self) -> None:
        auth: SPEKeycloakAuthenticator = self.authenticator
        if auth.end_session_url and self._id_token:
            query = {"id_token_hint": self._id_token, "client_id": auth.client_id}
            if auth.post_logout_url:
                query["post_logout_redirect_uri"] = auth.post_logout_url
            self.redirect(f"{auth.end_session_url}?{urlencode(query)}")
            return
        self.redirect(self.settings["login_url"], permanent=False)


class SPEKeycloakAuthenticator(GenericOAuthenticator):
    """GenericOAuthenticator admitting Keycloak ``researcher`` principals only (see module)."""

    logout_handler = SPELogoutHandler

    end_session_url = Unicode(
        "", config=True, help="Keycloak's OIDC end-session (logout) endpoint.")
    post_logout_url = Unicode(
        "", config=True, help="Where Keycloak sends the browser after logout (the hub login).")

    async def end_keycloak_session(self, refresh_token: str | None) -> bool:
        """Back-channel logout: Keycloak ends the SSO session the refresh token belongs to."""
        if not refresh_token or not self.end_session_url:
            return False
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                resp = await client.post(self.end_session_url, data={
                    "client_id": self.client_id, "client_secret": self.client_secret,
                    "refresh_token": refresh_token})
        except httpx.HTTPError as exc:
            self.log.warning("Keycloak logout failed: %s", exc)
            return False
        return resp.status_code in (200, 204)

    async def check_allowed(self, username: str, auth_model: dict[str, Any] | None) -> bool:
        if auth_model is None:  # JupyterHub's own calls without a model (existing users)
            return False
        roles = roles_of(auth_model, self.user_auth_state_key)
        allowed = REQUIRED_ROLE in roles
        await asyncio.to_thread(
            _audit, "hub.login", username,
            Outcome.SUCCESS if allowed else Outcome.REFUSED,
            None if allowed else f"no {REQUIRED_ROLE} realm role",
            roles=sorted(roles & {"researcher", "access-body", "hospital-admin", "operator"}))
        return allowed

    async def refresh_user(self, user: Any, handler: Any = None, **kwargs: Any) -> Any:
        model = await super().refresh_user(user, handler, **kwargs)
        if isinstance(model, dict) and REQUIRED_ROLE not in roles_of(
                model, self.user_auth_state_key):
            return False  # role removed in Keycloak: log in again (and be refused)
        return model
