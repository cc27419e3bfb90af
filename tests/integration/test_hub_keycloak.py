"""The real hub end to end: Keycloak login over HTTP, a sandboxed server per permit, escapes.

Starts the SPE API and JupyterHub (configurable-http-proxy from node_modules, the production
config in infra/jupyterhub) on loopback ports chosen here, against the running Keycloak and a
fresh control database. alice logs in through Keycloak's login form (authorization code flow
with PKCE), an access body issues her a permit over the permit API, she spawns the permit's
named server through the hub REST API and runs code in a kernel over the Jupyter websocket
channels. From inside that kernel every escape of DESIGN §9 is attempted and must fail, while
the same probe run by the host succeeds. Then: bob cannot open alice's server, carol (no
permit) cannot spawn, revoking the permit over the API kills the server within 10 s, so do
suspending a permit and amending it to remove the person (all measured), and logout ends the
Keycloak session. Everything made is removed, also on failure.

Needs root, bubblewrap, nftables, iproute2, the workspace runtime (var/runtime) and the
proxy (node_modules); Keycloak and (optionally) PostgreSQL from scripts/services.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from permits.terms import ComputeQuota
from spe.audit.models import AuditEntry
from spe.db import Database
from tests.e2e.browser import Browser
from tests.e2e.stack import REPO, Stack, cookie_header, run_code
from tests.integration.test_permit_service import body, register_dataset
from tests.keycloak_fixtures import password_of
from tests.security.test_sandbox import PROBE, outside
from workspaces import accounts
from workspaces.extracts import pseudonym_key
from workspaces.lifecycle import server_name
from workspaces.network import existing
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings
from workspaces.testing import TestNetns, dns_query

pytestmark = [
    pytest.mark.slow, pytest.mark.keycloak,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv"))
        or not (REPO / "node_modules" / ".bin" / "configurable-http-proxy").exists()
        or not (REPO / "var" / "runtime" / "bin" / "jupyterhub-singleuser").exists(),
        reason="needs root, bubblewrap, nftables, the proxy (npm install --prefix .) and the "
               "workspace runtime (python -m workspaces.runtime build var/runtime)"),
]
MEMORY_MB = 512
PG_URL = os.environ.get("SPE_TEST_POSTGRES_URL")


def _database(tmp: Path) -> Iterator[str]:
    if not PG_URL:
        yield f"sqlite:///{tmp / 'control.db'}"
        return
    from tests.conftest import _drop_pg_database, _fresh_pg_database

    url, name = _fresh_pg_database()
    try:
        yield url
    finally:
        _drop_pg_database(name)


def _leftovers(parent: str) -> dict[str, Any]:
    nft = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    cg = [p for p in Path("/sys/fs/cgroup").glob(f"*/**/{parent}") if p.is_dir()]
    with open("/etc/passwd") as fh:
        users = [line.split(":")[0] for line in fh if line.startswith(accounts.PREFIX)]
    return {"netns": existing(), "nft": [t for t in nft.split() if t.startswith("spe_ws_")],
            "cgroups": [str(p) for p in cg], "accounts": users}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keycloak_url: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hub")
    before = _leftovers("-")
    gen = _database(tmp)
    url = next(gen)
    db = Database(url)
    db.upgrade()
    register_dataset(db)
    db.dispose()
    st = Stack(data_dir=tmp / "var", database_url=url, keycloak_url=keycloak_url)
    st.data_dir.mkdir()
    try:
        st.start_api()
        st.start_hub()
        yield st
    finally:
        st.stop()
        with __import__("contextlib").suppress(StopIteration):
            next(gen)
        after = _leftovers(st.cgroup_parent)
        assert not after["cgroups"], after
        for key in ("netns", "nft", "accounts"):
            assert set(after[key]) <= set(before[key]), (key, after[key])


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


def _db(stack: Stack) -> Database:
    return Database(stack.database_url)


def _xsrf(browser: Browser, path: str = "/hub/") -> dict[str, str]:
    for c in browser.http.cookies.jar:
        if c.name == "_xsrf" and (c.path or "/") == path:
            return {"X-XSRFToken": c.value}
    return {}


def _login(stack: Stack, username: str) -> Browser:
    b = Browser()
    resp = b.keycloak_login(f"{stack.hub_url}/hub/oauth_login", username, password_of(username))
    assert resp.status_code == 200, (resp.status_code, resp.url, stack.hub.log_tail(2000)
                                     if stack.hub else "")
    return b


def _issue(stack: Stack, headers: dict[str, str], persons: list[str]) -> str:
    now = datetime.now(UTC).replace(microsecond=0)
    r = httpx.post(f"{stack.api_url}/v1/permits", headers=headers, timeout=60, json=body(
        reference=f"HUB-{uuid.uuid4().hex[:8]}", persons=persons,
        valid_from=(now - timedelta(days=1)).isoformat(),
        compute_quota={"gpus": 0, "cpus": 1, "memory_mb": MEMORY_MB, "disk_mb": 512}))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _server(stack: Stack, b: Browser, user: str, name: str) -> dict[str, Any] | None:
    r = b.get(f"{stack.hub_url}/hub/api/users/{user}", headers=_xsrf(b))
    assert r.status_code == 200, r.text
    return r.json()["servers"].get(name)  # type: ignore[no-any-return]


def test_only_researchers_log_in(stack: Stack, state: dict[str, Any]) -> None:
    alice = _login(stack, "alice")
    who = alice.get(f"{stack.hub_url}/hub/api/user", headers=_xsrf(alice))
    assert who.status_code == 200 and who.json()["name"] == "alice"
    assert who.json()["admin"] is False
    # the code flow uses PKCE (S256) and the confidential client of the realm
    start = httpx.get(f"{stack.hub_url}/hub/oauth_login", follow_redirects=False, timeout=30)
    location = start.headers["location"]
    assert "code_challenge_method=S256" in location and "client_id=jupyterhub" in location
    state["alice"] = alice
    hadmin = Browser()
    refused = hadmin.keycloak_login(f"{stack.hub_url}/hub/oauth_login", "hadmin",
                                    password_of("hadmin"))
    assert refused.status_code == 403
    with _db(stack).read() as s:
        logins = [(e.actor, e.outcome) for e in s.execute(
            select(AuditEntry).where(AuditEntry.action == "hub.login")).scalars()]
    assert ("alice", "success") in logins and ("hadmin", "refused") in logins


def test_spawn_run_code_and_escapes_fail(stack: Stack, state: dict[str, Any],
                                         client_headers: Callable[[str], dict[str, str]],
                                         tmp_path: Path) -> None:
    alice: Browser = state["alice"]
    pid = _issue(stack, client_headers("hdab-alpha"), ["alice"])
    name = server_name(pid)
    state["pid"], state["name"] = pid, name
    # the options form offers exactly alice's permits
    form = alice.get(f"{stack.hub_url}/hub/spawn/alice")
    assert pid in form.text and name in form.text, form.text[-2000:]
    t0 = time.monotonic()
    r = alice.post(f"{stack.hub_url}/hub/api/users/alice/servers/{name}", headers=_xsrf(alice),
                   json={"permit": pid})
    assert r.status_code in (201, 202), (r.status_code, r.text, stack.hub.log_tail()
                                         if stack.hub else "")
    while not (_server(stack, alice, "alice", name) or {}).get("ready"):
        assert time.monotonic() - t0 < 60, stack.hub.log_tail() if stack.hub else ""
        time.sleep(0.2)
    state["spawn_s"] = time.monotonic() - t0

    # Open the server like a browser: the hub's OAuth for the user server, then its cookie.
    base = stack.workspace_url("alice", name)
    page = alice.get(f"{stack.hub_url}/user/alice/{name}/lab")  # the hub sends it to its origin
    assert page.status_code == 200, (page.status_code, page.url)
    assert str(page.url).startswith(base + "/"), page.url
    xsrf = _xsrf(alice, f"/user/alice/{name}/")
    t1 = time.monotonic()
    k = alice.post(f"{base}/api/kernels", headers=xsrf, json={"name": "python3"})
    assert k.status_code == 201, k.text
    kernel = k.json()["id"]
    ws_url = base.replace("http://", "ws://", 1) + f"/api/kernels/{kernel}/channels"
    headers = {"Cookie": cookie_header(alice.http.cookies.jar, f"/user/alice/{name}/")}
    assert run_code(ws_url, headers, "print(6 * 7)").strip() == "42"
    state["kernel_s"] = time.monotonic() - t1

    # The workspace holds the SPE workspace token (never a Keycloak one) and spe.client.
    env = json.loads(run_code(ws_url, headers, textwrap.dedent("""
        import json, os, base64, spe.client
        tok = os.environ.get("SPE_TOKEN", "")
        claims = json.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "=="))
        c = spe.client.connect()
        try:
            b = c.budget(plot=False); api = "ok"
        except Exception as exc:
            api = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"iss": claims.get("iss"), "permit": os.environ.get("SPE_PERMIT_ID"),
                          "api_url": os.environ.get("SPE_API_URL"), "api": api,
                          "keycloak": [k for k, v in os.environ.items()
                                       if "realms/" in v or k.endswith("ACCESS_TOKEN")],
                          "uid": os.getuid()}))
    """)).strip().splitlines()[-1])
    assert env["iss"] == "urn:spe:workspace-token" and env["permit"] == pid
    assert env["api"] == "ok", env
    assert not env["keycloak"] and env["uid"] != 0

    # Escape attempts: targets that exist and that the host can reach.
    data = stack.data_dir
    store = data / "store"
    store.mkdir(exist_ok=True)
    (store / "raw.duckdb").write_bytes(b"row-level health data")
    key = pseudonym_key(data / "keys", pid)
    assert key
    secrets = [data / "hub" / "jupyterhub_cookie_secret", data / "hub" / "crypt_key",
               data / "hub" / "jupyterhub.sqlite"]
    ws_settings = WorkspaceSettings(runtime_dir=tmp_path / "none",
                                    allowed_host_ports=(stack.hub_port,),
                                    cgroup_parent=stack.cgroup_parent)
    other = Workspace.provision(workspaces_dir=data / "workspaces", person="mallory",
                                permit_id=f"other-{uuid.uuid4().hex[:6]}",
                                quota=ComputeQuota(memory_mb=256), settings=ws_settings)
    ns = TestNetns()
    listener = None
    try:
        ns.create()
        tcp, dns = ns.start_tcp(), ns.start_dns()
        assert other.run(["sh", "-c", "echo other-notes > ~/notes.txt"]).returncode == 0
        listener = other.popen(["/usr/bin/python3", "-c", textwrap.dedent("""
            import socket
            s = socket.socket(); s.bind(('0.0.0.0', 8888)); s.listen(4); print('ready', flush=True)
            while True:
                c, _ = s.accept(); c.sendall(b'other-workspace'); c.close()
        """)], stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        assert other.network is not None
        hub_pid = stack.hub.proc.pid if stack.hub else os.getpid()
        attempts: list[tuple[str, list[Any]]] = [
            ("raw data store", ["read", str(store / "raw.duckdb")]),
            ("other workspace", ["read", str(other.spec.home / "notes.txt")]),
            ("pseudonym key", ["read", str(data / "keys" / f"{pid.replace('-', '_')}.key")]),
            *[(f"hub secret {p.name}", ["read", str(p)]) for p in secrets],
            ("hub process", ["alive", hub_pid]),
            ("hub process listed", ["visible", hub_pid]),
            ("host in a test namespace", ["connect", ns.ns_ip, tcp]),
            ("another workspace's port", ["connect", other.network.ns_ip, 8888]),
            ("DNS server", ["udp", ns.ns_ip, dns, dns_query("example.org").hex()]),
            ("memory beyond the quota", ["hog", MEMORY_MB + 256]),
        ]
        code = "import json, subprocess, sys\nPROBE = " + repr(PROBE) + textwrap.dedent("""
            def probe(*args):
                p = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(args))],
                                   capture_output=True, text=True, timeout=90)
                return json.loads(p.stdout) if p.stdout.strip() else {
                    "ok": False, "error": f"exit {p.returncode}"}
            print(json.dumps([probe(*a) for a in ATTEMPTS]))
        """).replace("ATTEMPTS", repr([a for _, a in attempts]))
        inside = json.loads(run_code(ws_url, headers, code, timeout=300).strip().splitlines()[-1])
        resolve = json.loads(run_code(ws_url, headers, textwrap.dedent("""
            import json, socket
            try:
                print(json.dumps({"ok": True, "value": socket.gethostbyname("example.org")}))
            except OSError as exc:
                print(json.dumps({"ok": False, "error": type(exc).__name__}))
        """)).strip().splitlines()[-1])
        for (what, args), result in zip(attempts, inside, strict=True):
            assert not result["ok"], (what, result)
            assert outside(*args)["ok"], f"the check of {what!r} is not real: host failed too"
        assert not resolve["ok"], resolve
        # the kernel survived the memory probe (the OOM killer took the hog, not the server)
        assert run_code(ws_url, headers, "print('alive')").strip() == "alive"
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        ns.destroy()
        other.destroy(remove_home=True)
    state["ws_url"], state["headers"] = ws_url, headers


def test_other_researchers_are_refused(stack: Stack, state: dict[str, Any]) -> None:
    pid, name = state["pid"], state["name"]
    bob = _login(stack, "bob")
    base = stack.workspace_url("alice", name)
    page = bob.get(f"{base}/lab")
    assert page.status_code == 403 or f"/user/alice/{name}" not in str(page.url)
    api = bob.get(f"{base}/api/kernels")
    assert api.status_code in (302, 403) or api.status_code >= 400
    spawn = bob.post(f"{stack.hub_url}/hub/api/users/alice/servers/{name}", headers=_xsrf(bob))
    assert spawn.status_code in (403, 404)
    # bob is not named in alice's permit: his own server for it is refused
    own = bob.post(f"{stack.hub_url}/hub/api/users/bob/servers/{name}", headers=_xsrf(bob),
                   json={"permit": pid})
    assert own.status_code == 403, (own.status_code, own.text)
    carol = _login(stack, "carol")
    form = carol.get(f"{stack.hub_url}/hub/spawn/carol")
    assert "no active permit" in form.text
    refused = carol.post(f"{stack.hub_url}/hub/api/users/carol/servers/{name}",
                         headers=_xsrf(carol))
    assert refused.status_code == 403, (refused.status_code, refused.text)
    default = carol.post(f"{stack.hub_url}/hub/api/users/carol/server", headers=_xsrf(carol))
    assert default.status_code == 403, (default.status_code, default.text)
    with _db(stack).read() as s:
        spawns = [(e.actor, e.outcome) for e in s.execute(
            select(AuditEntry).where(AuditEntry.action == "workspace.spawn")).scalars()]
    assert ("alice", "success") in spawns
    assert ("bob", "refused") in spawns and ("carol", "refused") in spawns


def test_revocation_kills_the_server_within_10s(
        stack: Stack, state: dict[str, Any],
        client_headers: Callable[[str], dict[str, str]]) -> None:
    alice: Browser = state["alice"]
    pid, name = state["pid"], state["name"]
    ws_id = accounts.workspace_id("alice", pid)
    from workspaces.lifecycle import find_cgroup

    cg = find_cgroup(ws_id, stack.cgroup_parent)
    assert cg is not None and cg.pids()
    t0 = time.monotonic()
    r = httpx.post(f"{stack.api_url}/v1/permits/{pid}/revoke",
                   headers=client_headers("hdab-alpha"), json={"reason": "hub e2e test"},
                   timeout=30)
    assert r.status_code == 200, r.text
    while True:
        gone = _server(stack, alice, "alice", name) is None
        if gone and find_cgroup(ws_id, stack.cgroup_parent) is None:
            break
        assert time.monotonic() - t0 < 10, "server still running 10 s after revocation"
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    state["revoke_s"] = elapsed
    assert accounts.lookup(accounts.account_name(ws_id)) is None
    with _db(stack).read() as s:
        actions = [e.action for e in s.execute(
            select(AuditEntry).where(AuditEntry.target == ws_id)).scalars()]
    assert "workspace.stop" in actions and "auth.workspace_tokens_revoke" in actions
    print(f"\nspawn-to-ready {state['spawn_s']:.2f} s, kernel {state['kernel_s']:.2f} s, "
          f"revocation-to-gone {elapsed:.2f} s")


def _spawn(stack: Stack, b: Browser, user: str, pid: str) -> str:
    name = server_name(pid)
    r = b.post(f"{stack.hub_url}/hub/api/users/{user}/servers/{name}", headers=_xsrf(b),
               json={"permit": pid})
    assert r.status_code in (201, 202), (r.status_code, r.text)
    t0 = time.monotonic()
    while not (_server(stack, b, user, name) or {}).get("ready"):
        assert time.monotonic() - t0 < 60, stack.hub.log_tail() if stack.hub else ""
        time.sleep(0.2)
    return name


def _gone_within(stack: Stack, b: Browser, user: str, name: str, ws_id: str,
                 t0: float, what: str) -> float:
    from workspaces.lifecycle import find_cgroup

    while True:
        gone = _server(stack, b, user, name) is None
        if gone and find_cgroup(ws_id, stack.cgroup_parent) is None:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < 10, f"server still running 10 s after {what}"
        time.sleep(0.1)


def test_suspension_stops_the_server_within_10s(
        stack: Stack, state: dict[str, Any],
        client_headers: Callable[[str], dict[str, str]]) -> None:
    alice: Browser = state["alice"]
    pid = _issue(stack, client_headers("hdab-alpha"), ["alice"])
    name = _spawn(stack, alice, "alice", pid)
    ws_id = accounts.workspace_id("alice", pid)
    from workspaces import disk
    from workspaces.lifecycle import find_cgroup

    cg = find_cgroup(ws_id, stack.cgroup_parent)
    assert cg is not None and cg.pids()
    ws_root = stack.data_dir / "workspaces" / ws_id
    assert disk.is_mounted(ws_root / disk.MOUNT_NAME)  # the home is the quota'd image
    t0 = time.monotonic()
    r = httpx.post(f"{stack.api_url}/v1/permits/{pid}/suspend",
                   headers=client_headers("hdab-alpha"), json={"reason": "hub e2e test"},
                   timeout=30)
    assert r.status_code == 200, r.text
    elapsed = _gone_within(stack, alice, "alice", name, ws_id, t0, "suspension")
    assert not disk.is_mounted(ws_root / disk.MOUNT_NAME)
    assert disk.loop_devices(ws_root / disk.IMAGE_NAME) == []
    assert accounts.lookup(accounts.account_name(ws_id)) is None
    # a suspended permit cannot be spawned again
    again = alice.post(f"{stack.hub_url}/hub/api/users/alice/servers/{name}",
                       headers=_xsrf(alice), json={"permit": pid})
    assert again.status_code in (400, 403), (again.status_code, again.text)
    print(f"\nsuspension-to-gone {elapsed:.2f} s")


def test_amendment_removing_a_person_stops_their_server_within_10s(
        stack: Stack, state: dict[str, Any],
        client_headers: Callable[[str], dict[str, str]]) -> None:
    alice: Browser = state["alice"]
    headers = client_headers("hdab-alpha")
    pid = _issue(stack, headers, ["alice", "bob"])
    name = _spawn(stack, alice, "alice", pid)
    ws_id = accounts.workspace_id("alice", pid)
    etag = httpx.get(f"{stack.api_url}/v1/permits/{pid}", headers=headers,
                     timeout=30).headers["etag"]
    t0 = time.monotonic()
    r = httpx.patch(f"{stack.api_url}/v1/permits/{pid}", headers={**headers, "If-Match": etag},
                    json={"persons": ["bob"]}, timeout=30)
    assert r.status_code == 200, r.text
    elapsed = _gone_within(stack, alice, "alice", name, ws_id, t0, "the amendment")
    with _db(stack).read() as s:
        actions = [e.action for e in s.execute(
            select(AuditEntry).where(AuditEntry.target == ws_id)).scalars()]
    assert "workspace.stop" in actions
    print(f"\namendment-to-gone {elapsed:.2f} s")


def test_logout_ends_the_keycloak_session(stack: Stack, state: dict[str, Any]) -> None:
    alice: Browser = state["alice"]
    alice.get(f"{stack.hub_url}/hub/logout")
    again = alice.get(f"{stack.hub_url}/hub/oauth_login")
    assert "kc-form-login" in again.text  # Keycloak asks for the password again
    with _db(stack).read() as s:
        logouts = [e.details for e in s.execute(
            select(AuditEntry).where(AuditEntry.action == "hub.logout")).scalars()]
    assert logouts and logouts[-1].get("keycloak_session_ended") is True

