"""Identity: Keycloak token validation, typed principals, role dependencies, workspace tokens."""

from spe.auth.principal import Principal, Role

__all__ = ["Principal", "Role"]
