"""Workspace tokens: minted by the SPE, bound to (person, permit, workspace), accepted by the API
as a researcher-only principal, and refused at once when the workspace stops, the permit is
revoked or the permit checker says the permit is no longer active."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from spe.audit import verify_chain
from spe.audit.models import AuditEntry
from spe.auth import permit_checks
from spe.auth.keys import rotate_signing_key
from spe.auth.permit_checks import CHECKER_KEY
from spe.auth.workspace_tokens import (
    WORKSPACE_ISSUER,
    MintedToken,
    mint_workspace_token,
    revoke_permit_tokens,
    revoke_workspace_tokens,
)
from spe.config import Settings
from spe.db import Database
from spe.errors import Forbidden
from tests.keycloak_fixtures import bearer


class PermitStatus:
    """The permit-status contract the permits package fulfils: active ids only."""

    def __init__(self, *active: str) -> None:
        self.active = set(active)

    def __call__(self, session: Session, permit_id: str) -> bool:
        return permit_id in self.active


@pytest.fixture
def permits(api_app: FastAPI) -> PermitStatus:
    status = PermitStatus("P-1", "P-2")
    api_app.state.spe.put(CHECKER_KEY, status)
    return status


def _mint(db: Database, settings: Settings, permits: PermitStatus, *, permit: str = "P-1",
          workspace: str = "ws-alice-P-1", **kw: Any) -> MintedToken:
    with db.write() as session:
        return mint_workspace_token(session, settings, subject="sub-alice", username="alice",
                                    permit_id=permit, workspace_id=workspace, checker=permits,
                                    **kw)


def _me(client: TestClient, token: str) -> Any:
    return client.get("/v1/me", headers=bearer(token))


def test_workspace_token_is_a_researcher_bound_to_permit_and_workspace(
    api_client: TestClient, api_settings: Settings, db: Database, permits: PermitStatus
) -> None:
    minted = _mint(db, api_settings, permits)
    response = _me(api_client, minted.token)
    assert response.status_code == 200, response.text
    assert response.json() == {"subject": "sub-alice", "username": "alice", "kind": "workspace",
                               "roles": ["researcher"], "access_body": None,
                               "permit_id": "P-1", "workspace_id": "ws-alice-P-1"}
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert claims["aud"] == "spe-api" and claims["iss"] == WORKSPACE_ISSUER
    assert claims["exp"] - claims["iat"] == api_settings.workspace_token_ttl_seconds
    with db.read() as session:
        actions = [e.action for e in session.scalars(select(AuditEntry))]
        assert "auth.workspace_token_mint" in actions
        assert verify_chain(session).ok


def test_stopping_the_workspace_revokes_its_tokens_at_once(
    api_client: TestClient, api_settings: Settings, db: Database, permits: PermitStatus
) -> None:
    first = _mint(db, api_settings, permits)
    other = _mint(db, api_settings, permits, workspace="ws-alice-other")
    assert _me(api_client, first.token).status_code == 200
    with db.write() as session:
        assert revoke_workspace_tokens(session, "ws-alice-P-1") == 1
    refused = _me(api_client, first.token)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"] and "workspace stopped" in refused.json()["detail"]
    assert _me(api_client, other.token).status_code == 200


def test_revoking_the_permit_revokes_its_tokens_at_once(
    api_client: TestClient, api_settings: Settings, db: Database, permits: PermitStatus
) -> None:
    token = _mint(db, api_settings, permits).token
    kept = _mint(db, api_settings, permits, permit="P-2", workspace="ws-alice-P-2").token
    assert _me(api_client, token).status_code == 200
    with db.write() as session:
        assert revoke_permit_tokens(session, "P-1", reason="permit revoked") == 1
    assert _me(api_client, token).status_code == 401
    assert _me(api_client, kept).status_code == 200
    with db.read() as session:
        actions = [e.action for e in session.scalars(select(AuditEntry))]
    assert "auth.permit_tokens_revoke" in actions


def test_permit_no_longer_active_refuses_tokens_without_explicit_revocation(
    api_client: TestClient, api_settings: Settings, db: Database, permits: PermitStatus
) -> None:
    token = _mint(db, api_settings, permits).token
    assert _me(api_client, token).status_code == 200
    permits.active.discard("P-1")  # suspended / expired / revoked in the permits service
    refused = _me(api_client, token)
    assert refused.status_code == 401
    assert "not active" in refused.json()["detail"]
    with pytest.raises(Forbidden), db.write() as session:
        mint_workspace_token(session, api_settings, subject="s", username="alice",
                             permit_id="P-1", workspace_id="ws", checker=permits)


def test_without_a_permit_checker_workspace_tokens_are_refused(
    api_app: FastAPI, api_settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    minted = _mint(db, api_settings, PermitStatus("P-1"))
    monkeypatch.setattr(permit_checks, "_registered", None)  # what the permits package sets
    with TestClient(api_app) as client:  # no checker in this app, none registered globally
        response = _me(client, minted.token)
    assert response.status_code == 401
    assert "no permit checker" in response.json()["detail"]


def test_expired_workspace_token_is_refused(
    api_app: FastAPI, db: Database, api_settings: Settings, permits: PermitStatus
) -> None:
    settings = api_settings.model_copy(update={"token_leeway_seconds": 0})
    api_app.state.spe.settings = settings
    with TestClient(api_app) as client:  # minted after the app's start-up, which takes time
        minted = _mint(db, settings, permits, ttl_seconds=2)
        assert _me(client, minted.token).status_code == 200
        time.sleep(3.1)
        response = _me(client, minted.token)
    assert response.status_code == 401 and "expired" in response.json()["detail"]


def test_forged_and_altered_workspace_tokens_are_refused(
    api_client: TestClient, api_settings: Settings, db: Database, permits: PermitStatus
) -> None:
    minted = _mint(db, api_settings, permits)
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    attacker = Ed25519PrivateKey.generate()
    # own key under the SPE's kid: bad signature
    forged = jwt.encode({**claims, "permit_id": "P-2"}, attacker, algorithm="EdDSA",
                        headers={"kid": minted.kid})
    response = _me(api_client, forged)
    assert response.status_code == 401 and "signature" in response.json()["detail"]
    # own key, own kid
    forged = jwt.encode(claims, attacker, algorithm="EdDSA", headers={"kid": "spe-ws-evil"})
    response = _me(api_client, forged)
    assert response.status_code == 401 and "unknown" in response.json()["detail"]
    # HS256 with the kid: refused by algorithm
    forged = jwt.encode(claims, "guess-" * 8, algorithm="HS256", headers={"kid": minted.kid})
    assert _me(api_client, forged).status_code == 401
    # lifetime longer than the TTL, even when signed by the SPE key itself, is refused
    from spe.auth.keys import keyring_for

    with db.read() as session:
        kid, private = keyring_for(api_settings, db.url).signing_key(session)
    long_lived = jwt.encode({**claims, "exp": claims["iat"] + 10 * 86400}, private,
                            algorithm="EdDSA", headers={"kid": kid})
    response = _me(api_client, long_lived)
    assert response.status_code == 401 and "TTL" in response.json()["detail"]
    # a well-signed token without a grant row is refused
    unissued = jwt.encode({**claims, "jti": "never-issued"}, private, algorithm="EdDSA",
                          headers={"kid": kid})
    response = _me(api_client, unissued)
    assert response.status_code == 401 and "not issued" in response.json()["detail"]


def test_key_rotation_keeps_old_tokens_until_compromise_rotation(
    api_client: TestClient, api_settings: Settings, db: Database, permits: PermitStatus
) -> None:
    old = _mint(db, api_settings, permits)
    with db.write() as session:
        new_kid = rotate_signing_key(session, api_settings)
    new = _mint(db, api_settings, permits)
    assert new.kid == new_kid != old.kid
    assert _me(api_client, old.token).status_code == 200
    assert _me(api_client, new.token).status_code == 200
    with db.write() as session:
        rotate_signing_key(session, api_settings, retire_previous_now=True)
    assert _me(api_client, old.token).status_code == 401
    assert _me(api_client, new.token).status_code == 401
    assert _me(api_client, _mint(db, api_settings, permits).token).status_code == 200
