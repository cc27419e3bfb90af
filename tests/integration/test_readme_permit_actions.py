"""The README's permit actions (amend, suspend, resume, extend, revoke, each with If-Match) run
as written, with curl, against the live API and a real access-body token."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.test_api_fuzz import DATASET, TABLES, db_url, live_api  # noqa: F401
from tests.integration.test_permit_service import body

pytestmark = pytest.mark.keycloak
README = Path(__file__).parents[2] / "README.md"


def _block() -> str:
    text = README.read_text()
    start = text.index("Every permit action")
    match = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert match, "the README lost its permit actions"
    return match.group(1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_permit_actions_run(live_api: str,  # noqa: F811
                                   client_token: Callable[[str], str]) -> None:
    token = client_token("hdab-alpha")
    auth = {"Authorization": f"Bearer {token}"}
    issued = httpx.post(f"{live_api}/v1/permits", headers=auth, timeout=60, json=body(
        reference="README/0001/2026/FI", persons=["alice"],
        datasets=[{"dataset": DATASET, "tables": TABLES}]))
    assert issued.status_code == 201, issued.text
    permit_id = issued.json()["id"]
    script = _block()
    script = re.sub(r"^API=\S+; P=\S+", f"API={live_api}; P={permit_id}", script, flags=re.M)
    # Print each call's status instead of its body (the etag helper is unaffected).
    wrapper = 'curl() { command curl -s -o /dev/null -w "%{http_code}\\n" "$@"; }\n'
    result = subprocess.run(["bash", "-euc", wrapper + script], capture_output=True,
                            text=True, timeout=120, check=False,
                            env={**os.environ, "TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["200"] * 5, result.stdout + result.stderr
    final = httpx.get(f"{live_api}/v1/permits/{permit_id}", headers=auth, timeout=60).json()
    assert final["status"] == "revoked" and final["extended"] is True
    assert final["persons"] == ["alice", "bob"]
    versions = httpx.get(f"{live_api}/v1/permits/{permit_id}/versions", headers=auth,
                         timeout=60).json()["items"]
    assert len(versions) == 6
