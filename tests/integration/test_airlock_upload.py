"""Large export uploads: streamed to quarantine past the API-wide body limit, within the
upload route's own limit, with no orphan file after a refusal or a cut-off client.

Real Keycloak tokens, a real permit service, the real app (in-process and served by uvicorn
for the cut-off connection); the quarantine directory is inspected on disk.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from permits.service import PermitService
from permits.states import Action
from spe.audit.models import AuditEntry
from spe.config import Settings
from spe.db import Database
from tests.integration.test_airlock_api import base, issue, open_request, permits  # noqa: F401
from tests.integration.test_permit_service import ALPHA

pytestmark = pytest.mark.keycloak
Headers = Callable[[str], dict[str, str]]
FILE_LIMIT = 3_000_000


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    """The API-wide limit stays at its 1 MB default; one exported file may hold 3 MB."""
    assert api_settings.max_request_bytes == 1_000_000
    return api_settings.model_copy(update={"airlock_max_file_bytes": FILE_LIMIT})


def _csv(size: int) -> bytes:
    rows = [b"region,year,n\n"]
    total, i = len(rows[0]), 0
    while total < size:
        line = b"region_%03d,%d,%d\n" % (i % 200, 2000 + i % 25, 10 + i % 5000)
        rows.append(line)
        total += len(line)
        i += 1
    return b"".join(rows)


def _chunks(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _quarantined(settings: Settings) -> list[Path]:
    root = settings.data_dir / "airlock" / "quarantine"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _refusals(db: Database, status: int) -> list[AuditEntry]:
    with db.read() as s:
        return [e for e in s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars()
                if e.outcome == "refused" and (e.details or {}).get("status") == status]


def test_large_file_streams_in_and_limits_hold(api_client: TestClient, user_headers: Headers,
                                               api_settings: Settings, db: Database,
                                               permits: PermitService) -> None:  # noqa: F811
    pid = issue(permits)
    alice = user_headers("alice")
    rid = open_request(api_client, alice, pid)
    url = f"{base(pid)}/{rid}/files"
    octet = {**alice, "Content-Type": "application/octet-stream"}

    # 2.5 MB, over the API-wide 1 MB: accepted on this route, both declared and chunked.
    big = _csv(2_500_000)
    r = api_client.post(f"{url}?name=big.csv", content=big, headers=octet)
    assert r.status_code == 201, r.text
    assert r.json()["size"] == len(big)
    assert r.json()["sha256"] == hashlib.sha256(big).hexdigest()
    r = api_client.post(f"{url}?name=big2.csv", content=_chunks(big[:2_000_000]), headers=octet)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(big[:2_000_000]).hexdigest()
    stored = _quarantined(api_settings)
    assert len(stored) == 2 and all(p.stat().st_mode & 0o777 == 0o400 for p in stored)
    assert not [p for p in stored if p.name.endswith(".part")]

    # Over the route's limit: refused at once when declared, cut when chunked; audited.
    before = len(_refusals(db, 413))
    over = _csv(FILE_LIMIT + 100_000)
    r = api_client.post(f"{url}?name=over.csv", content=over, headers=octet)
    assert r.status_code == 413, r.text
    r = api_client.post(f"{url}?name=over.csv", content=_chunks(over), headers=octet)
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/problem+json"
    refused = _refusals(db, 413)[before:]
    # Both cut by the middleware at the route's limit (the chunked body before the route's
    # own counter, which writes in 1 MiB blocks, reached it), both audited.
    assert [e.action for e in refused] == ["api.request", "api.request"], refused
    assert _quarantined(api_settings) == stored  # nothing left behind

    # The 1 MB limit still holds on every other route, this one's JSON sibling included.
    huge = {"justification": "x" * 1_100_000}
    r = api_client.post(base(pid), json=huge, headers=alice)
    assert r.status_code == 413
    r = api_client.post(base(pid), content=_chunks(b"{" + b" " * 1_100_000 + b"}"),
                        headers={**alice, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["detail"] == "Request bodies are limited to 1000000 bytes."


def test_permit_byte_limit_refuses_before_and_while_streaming(
        api_client: TestClient, user_headers: Headers, api_settings: Settings, db: Database,
        permits: PermitService) -> None:  # noqa: F811
    pid = issue(permits, export_policy={"max_bytes": 1_500_000})
    alice = user_headers("alice")
    rid = open_request(api_client, alice, pid)
    octet = {**alice, "Content-Type": "application/octet-stream"}
    data = _csv(1_200_000)
    r = api_client.post(f"{base(pid)}/{rid}/files?name=a.csv", content=data, headers=octet)
    assert r.status_code == 201
    # 300 kB are left: a declared 1.2 MB is refused before reading; a chunked one mid-stream.
    r = api_client.post(f"{base(pid)}/{rid}/files?name=b.csv", content=data, headers=octet)
    assert r.status_code == 413 and "1500000" not in r.json()["detail"]
    r = api_client.post(f"{base(pid)}/{rid}/files?name=b.csv", content=_chunks(data),
                        headers=octet)
    assert r.status_code == 413
    assert len(_quarantined(api_settings)) == 1
    # The permit's limit is the route's own: both refusals audited under airlock.upload.
    assert [e.action for e in _refusals(db, 413)][-2:] == ["airlock.upload"] * 2


def test_no_orphan_when_the_record_is_refused(api_client: TestClient, user_headers: Headers,
                                              api_settings: Settings,
                                              permits: PermitService) -> None:  # noqa: F811
    """The permit is suspended while the bytes stream in: the database refuses the file at
    the end, and its staged bytes are gone."""
    pid = issue(permits)
    alice = user_headers("alice")
    rid = open_request(api_client, alice, pid)
    data = _csv(1_500_000)
    staged_seen: list[Path] = []

    def body() -> Iterator[bytes]:
        for i, chunk in enumerate(_chunks(data)):
            if i == 5:
                staged_seen.extend(_quarantined(api_settings))
                permits.transition(ALPHA, pid, Action.SUSPEND, reason="misuse investigated")
            yield chunk

    r = api_client.post(f"{base(pid)}/{rid}/files?name=a.csv", content=body(),
                        headers={**alice, "Content-Type": "application/octet-stream"})
    assert r.status_code == 409, r.text
    assert [p.name.endswith(".part") for p in staged_seen] == [True]  # it was being written
    assert _quarantined(api_settings) == []


def test_no_orphan_when_the_client_cuts_off(server_url: str, user_headers: Headers,
                                            api_settings: Settings,
                                            permits: PermitService) -> None:  # noqa: F811
    import httpx

    pid = issue(permits)
    alice = user_headers("alice")
    with httpx.Client(base_url=server_url, timeout=30) as http:
        r = http.post(base(pid), json={"justification": "Table 2 of the paper, aggregated."},
                      headers=alice)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
    where = urlsplit(server_url)
    head = (f"POST {base(pid)}/{rid}/files?name=a.csv HTTP/1.1\r\nHost: {where.netloc}\r\n"
            f"Authorization: {alice['Authorization']}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 2000000\r\n\r\n")
    with socket.create_connection((where.hostname, where.port)) as sock:
        sock.sendall(head.encode() + b"x" * 600_000)
        deadline = time.monotonic() + 20
        while not _quarantined(api_settings):  # the upload is being staged
            assert time.monotonic() < deadline, "the upload never reached quarantine"
            time.sleep(0.05)
    deadline = time.monotonic() + 20
    while _quarantined(api_settings):
        assert time.monotonic() < deadline, _quarantined(api_settings)
        time.sleep(0.05)
