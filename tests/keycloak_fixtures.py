"""Fixtures for tests against the real Keycloak (filled in by the identity work)."""
