"""The bearer-token validator an app uses, kept in a typed slot of ``AppState``.

``get_validator(state)`` returns the app's :class:`TokenValidator`, built once per app from
``state.settings`` and ``state.db`` (tests or deployments may put their own object with a
``validate(token) -> Principal`` method under :data:`VALIDATOR_KEY` first, with
``state.put(VALIDATOR_KEY, v)``).
``validate(token)`` returns a Principal or raises NotAuthenticated (401); it routes SPE
workspace tokens to :class:`WorkspaceTokenValidator` and everything else to
:class:`KeycloakTokenValidator`; each verifies the signature with its own keys only. A token
in the Keycloak validator's verified cache (``KeycloakTokenValidator.cached``) is answered
from it first: only a token that passed every Keycloak check is there, and workspace tokens
never are (they are not signed with the realm's keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from spe.api.state import AppState, StateKey
from spe.auth.keycloak_tokens import KeycloakTokenValidator
from spe.auth.principal import Principal
from spe.auth.workspace_tokens import WorkspaceTokenValidator, is_workspace_token
from spe.config import Settings
from spe.db import Database
from spe.errors import NotAuthenticated

_MAX_TOKEN_BYTES = 16_384


class TokenValidator(Protocol):
    def validate(self, token: str) -> Principal: ...


VALIDATOR_KEY: StateKey[TokenValidator] = StateKey("auth.validator")


class SPETokenValidator:
    """Keycloak access tokens and SPE workspace tokens."""

    def __init__(self, settings: Settings, db: Database,
                 extras: Mapping[str, Any] | None = None) -> None:
        self.keycloak = KeycloakTokenValidator(settings)
        self.workspace = WorkspaceTokenValidator(settings, db, extras)

    def validate(self, token: str) -> Principal:
        if len(token) > _MAX_TOKEN_BYTES:
            raise NotAuthenticated("The bearer token is too long.")
        # A token in the Keycloak validator's verified cache passed every Keycloak check
        # (realm key, realm issuer), so it is no workspace token: answered without the
        # routing hint's unverified decode, which costs more than the cache lookup.
        hit = self.keycloak.cached(token)
        if hit is not None:
            return hit
        if is_workspace_token(token):
            return self.workspace.validate(token)
        return self.keycloak.validate(token)


def get_validator(state: AppState) -> TokenValidator:
    """The app's validator, built once per app."""
    return state.get_or_create(
        VALIDATOR_KEY, lambda: SPETokenValidator(state.settings, state.db, state.slots))
