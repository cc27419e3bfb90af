"""Fuzz the live API from its own OpenAPI document, as an access body, a researcher and a
hospital admin (real Keycloak tokens), with schemathesis and all its checks on.

The API runs in uvicorn on a loopback port (the real server, real middleware) on a fresh
database with one small ingested dataset and one permit naming the researcher, so requests
reach past "not found". Each role's run uses a fixed seed and a bounded example count per
operation; the run must end with no failure at all: no server error, no status code, content
type or header the document does not list, no response that does not match its schema, no
schema-valid request refused without a documented reason, no method answered without 405 and
``Allow``.

Bounds: ``SPE_FUZZ_EXAMPLES`` (default 15) examples per operation and phase; the whole test
takes about a minute on two cores. ``SPE_FUZZ_LOG_DIR`` keeps each role's full report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from spe.api.app import create_app
from spe.auth.principal import SYSTEM
from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest
from spe.db import Database
from tests.integration.test_permit_service import body
from tests.ports import free_port

pytestmark = pytest.mark.keycloak
SEED = 20260411
EXAMPLES = int(os.environ.get("SPE_FUZZ_EXAMPLES", "15"))
DATASET = "fuzzdemo"
TABLES = {"person": ["person_id", "gender_concept_id", "year_of_birth"]}
ROLES = {"access-body": ("client", "hdab-alpha"), "researcher": ("user", "alice"),
         "hospital-admin": ("user", "hadmin")}


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite only: the fuzzer checks the HTTP contract, not the database backend."""
    yield f"sqlite:///{tmp_path / 'control.db'}"


@pytest.fixture
def live_api(db: Database, api_settings: Settings, tmp_path: Path) -> Iterator[str]:
    source = tmp_path / "omop"
    generator.generate(source, 40, seed=11, fmt="csv")
    settings = api_settings.model_copy(update={"dp_answer_time_bucket_seconds": 0.01})
    ingest(db, settings, DATASET, source, SYSTEM)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, db), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _schemathesis(url: str, token: str, report: Path, workdir: Path
                  ) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    config = Path(__file__).parents[1] / "fuzz" / "schemathesis.toml"
    command = [str(exe), "--config-file", str(config), "run", f"{url}/openapi.json",
               "--checks", "all",
               "--seed", str(SEED), "--max-examples", str(EXAMPLES), "--no-shrink",
               "--workers", "1", "--generation-database", "none",
               "--suppress-health-check", "all", "--request-timeout", "30",
               "--report", "junit", "--report-junit-path", str(report),
               "--no-color", "-H", f"Authorization: Bearer {token}"]
    # The token goes to the child's argv only (a loopback server, a short-lived test token).
    # Run in a scratch folder: schemathesis keeps a cache (.schemathesis/) in its working dir.
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False,
                          cwd=workdir, env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})


def test_fuzz_api_as_each_role(live_api: str, user_token: Callable[[str], str],
                               client_token: Callable[[str], str], tmp_path: Path) -> None:
    alpha = {"Authorization": f"Bearer {client_token('hdab-alpha')}"}
    issued = httpx.post(f"{live_api}/v1/permits", headers=alpha, timeout=60, json=body(
        reference="FUZZ/0001/2026/FI", persons=["alice"],
        datasets=[{"dataset": DATASET, "tables": TABLES}],
        privacy_budget={"epsilon": 5.0, "delta": 1e-6, "max_epsilon_per_query": 0.5}))
    assert issued.status_code == 201, issued.text
    permit_id = issued.json()["id"]
    summary: dict[str, str] = {}
    failed: list[str] = []
    try:
        for role, (kind, name) in ROLES.items():
            token = client_token(name) if kind == "client" else user_token(name)
            logs = Path(os.environ.get("SPE_FUZZ_LOG_DIR") or tmp_path)
            logs.mkdir(parents=True, exist_ok=True)
            result = _schemathesis(live_api, token, logs / f"{role}.xml", tmp_path)
            (logs / f"{role}.log").write_text(result.stdout + result.stderr)
            tail = "\n".join(result.stdout.splitlines()[-60:])
            counts = re.findall(r"(\d+ (?:passed|failed|errors?|skipped))", result.stdout)
            summary[role] = ", ".join(counts[-4:]) if counts else "(no summary)"
            if result.returncode != 0:
                failed.append(f"--- {role} (exit {result.returncode}):\n{tail}\n"
                              f"{result.stderr[-2000:]}")
    finally:
        httpx.post(f"{live_api}/v1/permits/{permit_id}/revoke", headers=alpha, timeout=60,
                   json={"reason": "fuzzing done"})
    print("schemathesis:", summary)
    assert not failed, "\n".join(failed)
