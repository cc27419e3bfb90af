"""The console's server side without a browser, on SQLite and PostgreSQL: the public register
holds no personal data, pages send the strict CSP, the login redirect carries PKCE, a callback
that does not match its login is refused and audited, sessions expire, and forms need their CSRF
token and the SPE's origin. (The full login through Keycloak in Chromium is in
tests/e2e/test_console_pages.py.)"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from permits.schemas import PermitCreate
from permits.service import PermitService
from spe.api.app import create_app
from spe.audit.models import AuditEntry
from spe.auth.principal import Role
from spe.config import Settings
from spe.db import Database
from spe.errors import NotAuthenticated
from spe.web import auth
from spe.web.models import WebSession
from tests.integration.test_permit_service import ALPHA, body, register_dataset

BASE = "http://testserver"


@pytest.fixture
def app_client(db: Database, tmp_path: Path) -> Iterator[tuple[TestClient, Database]]:
    register_dataset(db)
    service = PermitService(db)
    service.issue(ALPHA, PermitCreate.model_validate(body(reference="R-1/2026")))
    service.issue(ALPHA, PermitCreate.model_validate(body(
        reference="R-2/2026", holder={"organisation": "Jane Roe", "kind": "natural_person",
                                      "principal_investigator": "Jane Roe"})))
    settings = Settings(data_dir=tmp_path / "var", database_url=db.url, public_url=BASE,
                        audit_checkpoint_interval_seconds=0)
    with TestClient(create_app(settings, db), follow_redirects=False) as client:
        yield client, db


def _session(db: Database, *, roles: list[str], expired: bool = False) -> tuple[str, str]:
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    with db.write() as s:
        s.add(WebSession(id=auth._hash(token), kind="user", csrf=csrf, created_at=now,
                         expires_at=now + timedelta(seconds=-5 if expired else 600),
                         data={"principal": {"subject": "s", "username": "hadmin",
                                             "kind": "user", "roles": roles,
                                             "access_body": None},
                               "id_token": "id.token.value"}))
    return token, csrf


def _actions(db: Database, action: str) -> list[tuple[str, str]]:
    with db.read() as s:
        return [(e.actor, e.outcome) for e in s.execute(
            select(AuditEntry).where(AuditEntry.action == action)).scalars()]


def test_register_has_no_personal_data(app_client: tuple[TestClient, Database]) -> None:
    client, _ = app_client
    data = client.get("/register.json").json()["permits"]
    assert [p["reference"] for p in data] == ["R-1/2026", "R-2/2026"]
    assert data[0]["holder_organisation"] == "Uni"
    assert "natural person" in data[1]["holder_organisation"]
    text = client.get("/register.json").text + client.get("/register").text
    for private in ("alice", "bob", "Dr PI", "Jane Roe", "persons", "because"):
        assert private not in text
    page = client.get("/register")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_pages_need_a_session_and_login_uses_pkce(app_client: tuple[TestClient, Database]
                                                  ) -> None:
    client, db = app_client
    for path in ("/console", "/console/audit", "/console/datasets", "/console/permits/x"):
        response = client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/console/login?next=")
        assert "content-security-policy" in response.headers
    login = client.get("/console/login", params={"next": "/console/audit"})
    assert login.status_code == 303
    url = urlsplit(login.headers["location"])
    query = parse_qs(url.query)
    assert url.path.endswith("/realms/spe/protocol/openid-connect/auth")
    assert query["client_id"] == ["spe-console"] and query["response_type"] == ["code"]
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["redirect_uri"] == [f"{BASE}/console/callback"]
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/console/callback" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see test_cookie_is_secure_over_tls
    # a callback whose state does not match its login is refused, audited, nothing echoed
    client.cookies.set("spe_console_login", "not-a-login", path="/console/callback")
    refused = client.get("/console/callback", params={"code": "c0de", "state": "st4te-x"})
    assert refused.status_code == 401
    assert "st4te-x" not in refused.text and "c0de" not in refused.text
    assert ("anonymous", "refused") in _actions(db, "web.login")
    # an open redirect through next= is not possible
    other = client.get("/console/login", params={"next": "//evil.example/x"})
    with db.read() as s:
        rows = s.execute(select(WebSession).where(WebSession.kind == "login")).scalars().all()
        assert {r.data["next"] for r in rows} == {"/console/audit", "/console"}
    assert other.status_code == 303


def test_cookie_is_secure_over_tls(db: Database, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", public_url="https://spe.example.org",
                        audit_checkpoint_interval_seconds=0)
    with TestClient(create_app(settings, db), follow_redirects=False) as client:
        cookie = client.get("/console/login").headers["set-cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie


def test_forms_need_csrf_and_origin(app_client: tuple[TestClient, Database]) -> None:
    client, db = app_client
    token, csrf = _session(db, roles=["hospital-admin"])
    client.cookies.set("spe_console", token)
    page = client.get("/console/audit")
    assert page.status_code == 200 and "default-src 'none'" in \
        page.headers["content-security-policy"]
    assert csrf in client.get("/console").text  # the logout form carries it
    assert client.post("/console/logout", data={}).status_code == 403
    assert client.post("/console/logout", data={"csrf": "wrong"}).status_code == 403
    assert client.post("/console/logout", data={"csrf": csrf},
                       headers={"origin": "https://evil.example"}).status_code == 403
    assert _actions(db, "web.refused") == [("hadmin", "refused")] * 3
    out = client.post("/console/logout", data={"csrf": csrf}, headers={"origin": BASE})
    assert out.status_code == 303
    query = parse_qs(urlsplit(out.headers["location"]).query)
    assert query["id_token_hint"] == ["id.token.value"]
    assert query["post_logout_redirect_uri"] == [f"{BASE}/console/logged-out"]
    assert client.get("/console").status_code == 303  # the session is gone
    assert _actions(db, "web.logout") == [("hadmin", "success")]


def test_expired_session_is_refused_and_deleted(app_client: tuple[TestClient, Database]
                                                ) -> None:
    client, db = app_client
    token, _ = _session(db, roles=["hospital-admin"], expired=True)
    client.cookies.set("spe_console", token)
    assert client.get("/console").status_code == 303
    with db.read() as s:
        assert s.get(WebSession, auth._hash(token)) is None
    stale, _ = _session(db, roles=["researcher"], expired=True)
    client.get("/console/login")  # a new login sweeps every expired row
    with db.read() as s:
        assert s.get(WebSession, auth._hash(stale)) is None


def test_researcher_gets_404_for_admin_pages(app_client: tuple[TestClient, Database]) -> None:
    client, db = app_client
    token, _ = _session(db, roles=["researcher"])
    client.cookies.set("spe_console", token)
    for path in ("/console/datasets", "/console/workspaces", "/console/permits/nope",
                 "/console/permits/nope/revoke"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "nope" not in response.text


def test_access_body_officer_principal() -> None:
    claims = {"sub": "u1", "preferred_username": "officer-alpha", "azp": "spe-console",
              "realm_access": {"roles": ["access-body"]},
              "spe_groups": ["/access-bodies/hdab-alpha", "/permit-x"]}
    officer = auth._principal(claims)
    assert officer.kind == "service" and officer.access_body == "hdab-alpha"
    assert officer.username == "officer-alpha" and Role.ACCESS_BODY in officer.roles
    with pytest.raises(NotAuthenticated):
        auth._principal({**claims, "spe_groups": ["/access-bodies/hdab-alpha",
                                                  "/access-bodies/hdab-beta"]})
    with pytest.raises(NotAuthenticated):
        auth._principal({**claims, "spe_groups": []})
    with pytest.raises(NotAuthenticated):  # a client's own token is no person
        auth._principal({**claims, "preferred_username": "service-account-spe-console"})
    researcher = auth._principal({**claims, "realm_access": {"roles": ["researcher"]}})
    assert researcher.kind == "user" and researcher.access_body is None
