"""The body-size limit and security headers hold on every route, chunked bodies included."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.testclient import TestClient

from spe.api.app import create_app
from spe.config import Settings
from spe.db import Database


def _client(db: Database, limit: int) -> TestClient:
    settings = Settings(database_url=db.url, max_request_bytes=limit)
    return TestClient(create_app(settings, db))


def _chunks(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"x" * 512
        sent += 512


def test_declared_and_chunked_bodies_over_limit_refused(sqlite_db: Database) -> None:
    client = _client(sqlite_db, 2048)
    declared = client.post("/v1/datasets", content=b"x" * 4096)
    assert declared.status_code == 413
    assert declared.headers["content-type"] == "application/problem+json"
    chunked = client.post("/v1/datasets", content=_chunks(4096))
    assert chunked.status_code == 413
    assert chunked.json()["detail"] == "Request bodies are limited to 2048 bytes."


def test_small_chunked_body_reaches_the_route(sqlite_db: Database) -> None:
    client = _client(sqlite_db, 2048)
    # The route exists only for GET: the body got through the limit and the router answered.
    response = client.post("/v1/datasets", content=_chunks(1024))
    assert response.status_code == 405


def test_headers_on_every_response(sqlite_db: Database) -> None:
    response = _client(sqlite_db, 2048).get("/healthz")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert len(response.headers["x-request-id"]) == 32
