"""The bearer-token validator an app uses, kept in ``AppState.extras``.

``get_validator(state)`` returns the app's :class:`TokenValidator` (created on first use from
``state.settings`` and ``state.db``). ``validate(token)`` returns a Principal or raises
NotAuthenticated.
"""

from __future__ import annotations

from typing import Protocol

from spe.api.state import AppState
from spe.auth.principal import Principal
from spe.errors import NotAuthenticated

EXTRAS_KEY = "auth.validator"


class TokenValidator(Protocol):
    def validate(self, token: str) -> Principal: ...


class _Unavailable:
    def validate(self, token: str) -> Principal:
        raise NotAuthenticated("Token validation is not configured on this server.")


def get_validator(state: AppState) -> TokenValidator:
    """The app's validator, built once per app."""
    validator = state.extras.get(EXTRAS_KEY)
    if validator is None:
        validator = _Unavailable()
        state.extras[EXTRAS_KEY] = validator
    return validator  # type: ignore[no-any-return]
