"""/docs and /redoc work offline: every script and style sheet they load is served by the SPE."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from spe.api.app import create_app
from spe.api.docs import ASSETS
from spe.config import Settings
from spe.db import Database


def test_docs_pages_load_only_their_own_assets(sqlite_db: Database) -> None:
    client = TestClient(create_app(Settings(database_url=sqlite_db.url), sqlite_db))
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", r.text)
        assert urls, page
        assert not [u for u in urls if "://" in u or u.startswith("//")], (page, urls)
        for url in urls:
            if url:
                asset = client.get(url)
                assert asset.status_code == 200, url
                assert len(asset.content) > 10_000, url
        assert "/openapi.json" in r.text
    for name, media in ASSETS.items():
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), name
    r = client.get("/docs/assets/..%2Fpyproject.toml")
    assert r.status_code == 404
    assert client.get("/docs/assets/index.html").status_code == 404
