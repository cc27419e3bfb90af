"""Export writes are rate-limited per token and per permit (429 + Retry-After, audited), uploads
per token at once; the notebook client retries a refused upload by reopening the file.

Real Keycloak tokens, a real permit service and the real app in-process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from permits.service import PermitService
from spe.airlock.limits import ExportLimits
from spe.audit.models import AuditEntry
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from spe.dp.limits import RateLimited
from tests.integration.test_airlock_api import base, issue, permits  # noqa: F401

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]
JUST = {"justification": "Table 2 of the paper, aggregated.", "receipts": []}


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    """Two writes per token, three per permit, refilled about once an hour."""
    return api_settings.model_copy(update={
        "airlock_token_write_burst": 2, "airlock_token_writes_per_minute": 0.02,
        "airlock_permit_write_burst": 3, "airlock_permit_writes_per_minute": 0.02})


def _refusals(db: Database) -> list[AuditEntry]:
    with db.read() as s:
        return [e for e in s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars()
                if e.outcome == "refused" and (e.details or {}).get("status") == 429]


def test_token_and_permit_limits(api_client: TestClient, user_headers: Headers, db: Database,
                                 permits: PermitService) -> None:  # noqa: F811
    pid = issue(permits)
    alice, bob = user_headers("alice"), user_headers("bob")
    rid = api_client.post(base(pid), json=JUST, headers=alice).json()["id"]
    r = api_client.post(f"{base(pid)}/{rid}/files?name=t.csv", content=b"sex,n\nF,40\n",
                        headers={**alice, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    # Alice's third write: her token's limit, whatever the route.
    r = api_client.post(f"{base(pid)}/{rid}/submit", headers=alice)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) > 60  # about an hour at 0.02 per minute
    assert "token" in r.json()["detail"]
    assert api_client.get(f"{base(pid)}/{rid}", headers=alice).json()["state"] == "draft"
    # Bob has his own token bucket but the permit has one write left, then none.
    assert api_client.post(base(pid), json=JUST, headers=bob).status_code == 201
    r = api_client.post(base(pid), json=JUST, headers=bob)
    assert r.status_code == 429 and "permit" in r.json()["detail"]
    assert len(_refusals(db)) == 2
    # Reads are not limited.
    assert api_client.get(base(pid), headers=bob).status_code == 200


def test_concurrent_uploads_per_token(api_settings: Settings) -> None:
    limits = ExportLimits(api_settings.model_copy(update={
        "airlock_token_concurrent_uploads": 1, "airlock_token_write_burst": 10}))
    with limits.upload("p", "token:a"):
        with pytest.raises(RateLimited) as err, limits.upload("p", "token:a"):
            pass
        assert err.value.headers == {"Retry-After": "1"}
        with limits.upload("p", "token:b"):  # another token is not held back
            pass
    with limits.upload("p", "token:a"):  # the first one ended
        pass


class _RefuseFirstUpload(httpx.BaseTransport):
    """Answers the first upload 429 after consuming its body (as a proxy in front of the API
    may), then passes requests to the app: a blind retry would have nothing left to send."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.refused = inner, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/files") and not self.refused:
            self.refused += 1
            request.read()
            return httpx.Response(429, headers={"Retry-After": "1"},
                                  json={"detail": "slow down"})
        return self.inner.handle_request(request)


def test_client_reopens_the_file_to_retry_an_upload(api_client: TestClient,
                                                    api_settings: Settings, db: Database,
                                                    permits: PermitService,  # noqa: F811
                                                    tmp_path: Path) -> None:
    from spe.client import Client

    pid = issue(permits, export_policy={"allowed_kinds": ["txt"]})
    with db.write() as s:
        token = mint_workspace_token(s, api_settings, subject="alice-subject", username="alice",
                                     permit_id=pid, workspace_id="ws-l").token
    transport = _RefuseFirstUpload(api_client._transport)  # type: ignore[arg-type]
    client = Client("http://testserver", token, pid, transport=transport)
    note = tmp_path / "note.txt"
    note.write_bytes(b"methods note for the reviewers\n" * 40_000)  # > one 1 MiB chunk
    got: dict[str, Any] = client.export(note, "methods note for the paper", submit=False)
    assert transport.refused == 1
    (recorded,) = got["files"]
    assert recorded["size"] == note.stat().st_size  # the whole file, not a consumed stream
    assert recorded["sha256"] == hashlib.sha256(note.read_bytes()).hexdigest()
