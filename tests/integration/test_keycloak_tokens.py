"""Tokens from the real Keycloak: each demo role and each access body is accepted by the API
with the right principal; a disabled user gets no token; a missing role is a 403."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient

from spe.auth.deps import require_role
from spe.auth.principal import Principal, Role
from tests.keycloak_fixtures import (
    ACCESS_BODIES,
    TokenRequestRefused,
    bearer,
    fetch_user_token,
)

EXPECTED_ROLES = {
    "alice": ["researcher"], "bob": ["researcher"], "carol": ["researcher"],
    "hadmin": ["hospital-admin"], "hadmin2": ["hospital-admin"], "op": ["operator"],
}


@pytest.mark.parametrize("username", sorted(EXPECTED_ROLES))
def test_demo_user_token_is_accepted_with_its_roles(
    api_client: TestClient, user_token: Callable[[str], str], username: str
) -> None:
    response = api_client.get("/v1/me", headers=bearer(user_token(username)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["username"] == username
    assert body["kind"] == "user"
    assert body["roles"] == EXPECTED_ROLES[username]
    assert body["access_body"] is None


@pytest.mark.parametrize("client_id", ACCESS_BODIES)
def test_access_body_client_token_is_a_service_principal(
    api_client: TestClient, client_token: Callable[[str], str], client_id: str
) -> None:
    response = api_client.get("/v1/me", headers=bearer(client_token(client_id)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {**body, "username": client_id, "kind": "service",
                    "roles": ["access-body"], "access_body": client_id}


def test_disabled_user_cannot_obtain_a_token(keycloak_url: str) -> None:
    with pytest.raises(TokenRequestRefused) as refused:
        fetch_user_token(keycloak_url, "dave")
    assert refused.value.error == "invalid_grant"


def test_wrong_password_gets_no_token(keycloak_url: str) -> None:
    with pytest.raises(TokenRequestRefused):
        fetch_user_token(keycloak_url, "alice", password="not-alices-password")


def _guarded(app: FastAPI) -> TestClient:
    router = APIRouter()

    @router.get("/test/admin-only")
    def admin_only(p: Principal = Depends(require_role(Role.HOSPITAL_ADMIN))) -> dict[str, str]:
        return {"username": p.username}

    @router.get("/test/body-or-operator")
    def body_or_op(
        p: Principal = Depends(require_role(Role.ACCESS_BODY, Role.OPERATOR)),
    ) -> dict[str, str]:
        return {"username": p.username}

    app.include_router(router)
    return TestClient(app)


def test_require_role_admits_the_role_and_refuses_others_with_403(
    api_app: FastAPI, user_token: Callable[[str], str], client_token: Callable[[str], str]
) -> None:
    client = _guarded(api_app)
    ok = client.get("/test/admin-only", headers=bearer(user_token("hadmin")))
    assert ok.status_code == 200 and ok.json() == {"username": "hadmin"}
    token = user_token("alice")
    refused = client.get("/test/admin-only", headers=bearer(token))
    assert refused.status_code == 403
    problem = refused.json()
    assert problem["type"].endswith("/forbidden")
    assert "hospital-admin" in problem["detail"]
    assert token not in refused.text
    assert client.get("/test/body-or-operator",
                      headers=bearer(client_token("hdab-alpha"))).status_code == 200
    assert client.get("/test/body-or-operator", headers=bearer(user_token("op"))).status_code == 200
    many = client.get("/test/body-or-operator", headers=bearer(user_token("bob")))
    assert many.status_code == 403
    assert "access-body" in many.json()["detail"] and "operator" in many.json()["detail"]
    assert client.get("/test/admin-only").status_code == 401


def test_missing_or_malformed_authorization_is_401_with_challenge(api_client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Basic YWxpY2U6eA=="}, {"Authorization": "Bearer "},
                    {"Authorization": "Bearer not-a-jwt"}):
        response = api_client.get("/v1/me", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.headers.get("www-authenticate", "").startswith("Bearer")
        assert "not-a-jwt" not in response.text
