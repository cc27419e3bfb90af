"""Workspace tokens neither expire under a working researcher nor work outside the workspace.

A real stack (SPE API, JupyterHub, Keycloak login, a sandboxed server) with 60 s workspace
tokens, so the spawner refreshes them every 20 s.

* **Binding**: the workspace's token, copied out of the workspace (read from its token file on
  the host), is refused by the API from the host's address, while the same token works from
  inside the workspace. Control: a token minted for the same workspace without an address
  works from the host (the check is what refuses).
* **Refresh**: a notebook's client made at the start keeps working after the hub replaced the
  token and the first token was revoked (as if it had expired): it reads the newest token on
  every request. Control: a client holding only the first token is refused.

Needs what tests/integration/test_hub_keycloak.py needs.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from sqlalchemy import update

from spe.auth.models import WorkspaceGrant
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from tests.e2e.stack import Stack, cookie_header, run_code
from tests.integration.test_hub_keycloak import _database, _issue, _login, _spawn, _xsrf
from tests.integration.test_hub_keycloak import pytestmark as hub_marks
from tests.integration.test_permit_service import register_dataset
from workspaces import accounts

pytestmark = hub_marks
TTL = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keycloak_url: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("tokens")
    gen = _database(tmp)
    url = next(gen)
    db = Database(url)
    db.upgrade()
    register_dataset(db)
    db.dispose()
    st = Stack(data_dir=tmp / "var", database_url=url, keycloak_url=keycloak_url,
               extra_env={"SPE_WORKSPACE_TOKEN_TTL_SECONDS": str(TTL)})
    st.data_dir.mkdir()
    try:
        st.start_api()
        st.start_hub()
        yield st
    finally:
        st.stop()
        with contextlib.suppress(StopIteration):
            next(gen)


def _token_file(stack: Stack, ws_id: str) -> Path:
    found = list((stack.data_dir / "workspaces" / ws_id).glob("**/.spe/token"))
    assert len(found) == 1, found
    return found[0]


def _in_kernel(ws_url: str, cookie: str, code: str) -> dict[str, str]:
    out = run_code(ws_url, {"Cookie": cookie}, textwrap.dedent(code))
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_tokens_are_bound_and_refreshed(
        stack: Stack, client_headers: Callable[[str], dict[str, str]]) -> None:
    alice = _login(stack, "alice")
    pid = _issue(stack, client_headers("hdab-alpha"), ["alice"])
    name = _spawn(stack, alice, "alice", pid)
    ws_id = accounts.workspace_id("alice", pid)
    page = alice.get(f"{stack.hub_url}/user/alice/{name}/lab")
    assert page.status_code == 200
    base = stack.workspace_url("alice", name)
    kernel = alice.post(f"{base}/api/kernels", headers=_xsrf(alice, f"/user/alice/{name}/"),
                        json={"name": "python3"})
    assert kernel.status_code == 201, kernel.text
    ws_url = base.replace("http://", "ws://", 1) + f"/api/kernels/{kernel.json()['id']}/channels"
    cookie = cookie_header([c for c in alice.http.cookies.jar
                            if c.domain.endswith(".localhost")], f"/user/alice/{name}/")
    budget_url = f"{stack.api_url}/v1/permits/{pid}/budget"

    inside = _in_kernel(ws_url, cookie, """
        import json, os, spe.client
        c = spe.client.connect()   # the notebook's client, kept for the whole session
        def attempt(client):
            try:
                client.budget(plot=False)
                return "ok"
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
        print(json.dumps({"api": attempt(c), "file": os.environ.get("SPE_TOKEN_FILE", "")}))
    """)
    assert inside["api"] == "ok", inside
    assert inside["file"].endswith("/.spe/token")

    # binding: the token copied out of the workspace is refused from the host
    path = _token_file(stack, ws_id)
    first = path.read_text().strip()
    assert jwt.decode(first, options={"verify_signature": False}).get("addr")
    copied = httpx.get(budget_url, headers={"Authorization": f"Bearer {first}"}, timeout=30)
    assert copied.status_code == 401, copied.text
    assert "bound to its workspace" in copied.json()["detail"]
    db = Database(stack.database_url)
    try:
        with db.write() as session:
            unbound = mint_workspace_token(
                session, Settings(data_dir=stack.data_dir, database_url=stack.database_url,
                                  workspace_token_ttl_seconds=TTL),
                subject="alice", username="alice", permit_id=pid, workspace_id=ws_id)
        control = httpx.get(budget_url, headers={"Authorization": f"Bearer {unbound.token}"},
                            timeout=30)
        assert control.status_code == 200, control.text  # the address check is what refused

        # refresh: within a third of the lifetime (+ a poll) the hub writes a new token
        t0 = time.monotonic()
        while (fresh := path.read_text().strip()) == first:
            assert time.monotonic() - t0 < TTL / 3 + 15, "no fresh token"
            time.sleep(0.5)
        assert jwt.decode(fresh, options={"verify_signature": False})["jti"] != jwt.decode(
            first, options={"verify_signature": False})["jti"]
        # the first token ends (revoked here, as if it had expired)
        jti = jwt.decode(first, options={"verify_signature": False})["jti"]
        with db.write() as session:
            session.execute(update(WorkspaceGrant).where(WorkspaceGrant.jti == jti).values(
                revoked_at=WorkspaceGrant.issued_at, revoked_reason="test: first token ended"))
    finally:
        db.dispose()
    after = _in_kernel(ws_url, cookie, """
        import json, os
        only_first = spe.client.Client(os.environ["SPE_API_URL"], os.environ["SPE_TOKEN"],
                                       os.environ["SPE_PERMIT_ID"])
        print(json.dumps({"kept": attempt(c), "first_only": attempt(only_first)}))
    """)
    assert after["kept"] == "ok", after                 # the notebook's client did not notice
    assert after["first_only"].startswith("SPEClientError") and "401" in after["first_only"]
