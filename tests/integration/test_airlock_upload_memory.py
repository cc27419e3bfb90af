"""A 100 MB export file streams through the real server into quarantine without the API
holding it in memory: Python's allocations peak at a few MB (tracemalloc, the server runs in
this process under uvicorn; the client streams from a generator), declared or chunked."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Callable, Iterator

import httpx
import pytest

from permits.service import PermitService
from tests.integration.test_airlock_api import base, issue, permits  # noqa: F401

pytestmark = pytest.mark.keycloak
BLOCK = b"region_001,2001,123\n" * 3277  # 64 KiB
BLOCKS = 1600  # 105 MB


def _body() -> Iterator[bytes]:
    for _ in range(BLOCKS):
        yield BLOCK


def test_100_mb_upload_is_streamed(server_url: str, user_headers: Callable[[str], dict[str, str]],
                                   permits: PermitService) -> None:  # noqa: F811
    pid = issue(permits)
    alice = user_headers("alice")
    digest = hashlib.sha256(BLOCK * BLOCKS).hexdigest()
    with httpx.Client(base_url=server_url, timeout=120) as http:
        r = http.post(base(pid), json={"justification": "Table 2 of the paper, aggregated."},
                      headers=alice)
        rid = r.json()["id"]
        tracemalloc.start()
        try:
            for declared in ({}, {"Content-Length": str(len(BLOCK) * BLOCKS)}):
                tracemalloc.reset_peak()
                r = http.post(f"{base(pid)}/{rid}/files?name=big.csv", content=_body(),
                              headers={**alice, **declared,
                                       "Content-Type": "application/octet-stream"})
                _, peak = tracemalloc.get_traced_memory()
                assert r.status_code == 201, r.text
                assert r.json()["size"] == len(BLOCK) * BLOCKS
                assert r.json()["sha256"] == digest
                assert peak < 16_000_000, peak  # the file is 105 MB
        finally:
            tracemalloc.stop()
