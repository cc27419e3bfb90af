"""The notebook client waits out a rate-limit refusal (429 + Retry-After) and retries, against
the real API with a token limit of one request per second."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from spe.client import Client
from spe.config import Settings
from spe.db import Database
from tests.integration.test_dp_api import (  # noqa: F401 - fixtures used by name
    Permits,
    _workspace_token,
    dataset,
    omop_source,
)


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    return api_settings.model_copy(update={"dp_answer_time_bucket_seconds": 0.02,
                                           "api_token_burst": 1,
                                           "api_token_requests_per_minute": 60.0})


def test_client_retries_after_429(server_url: str, db: Database,
                                  api_settings: Settings, dataset: str,  # noqa: F811
                                  client_headers: Any) -> None:
    with httpx.Client(base_url=server_url, timeout=60) as http:
        permits = Permits(http.post, client_headers("hdab-alpha"))
        try:
            pid = permits.issue("DP/0010/2026/FI")
            token = _workspace_token(db, api_settings, pid)["Authorization"].split()[1]
            raw = http.get(f"/v1/permits/{pid}/budget",
                           headers={"Authorization": f"Bearer {token}"})
            assert raw.status_code == 200
            refused = http.get(f"/v1/permits/{pid}/budget",
                               headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 429 and "retry-after" in refused.headers  # control
            started = time.monotonic()
            budget = Client(server_url, token, pid).budget(plot=False)  # waits, then succeeds
            assert budget.data["epsilon_spent"] == 0
            assert time.monotonic() - started >= 0.1
        finally:
            permits.cleanup()
