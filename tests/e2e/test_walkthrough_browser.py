"""docs/walkthrough.md as one test, in headless Chromium against the real stack.

The steps, their code and their screenshots come from :mod:`tests.e2e.walkthrough_steps`, the
module the page is generated from; this test runs each step marked tested, in that order
(:data:`ACTIONS` must name exactly those). The stack is real: Keycloak from
scripts/services.sh, the SPE API with the console and JupyterHub with the sandboxing spawner
(tests/e2e/stack.py), over a small copy of the bundled synthetic OMOP dataset. The access body
issues the permit with its client-credentials token; alice logs in through Keycloak and starts
the workspace in the browser, and the notebook cells are typed into JupyterLab and run there
(the ``%%dp`` magic, the client, a plot, a Ray task on Ray's *logical* GPU: there is no GPU on
this machine, the hub hands out index 0 from ``SPE_WS_GPU_INDICES``, and two export requests);
two hospital admins review in the console; the access body revokes; the workspace must stop
within 10 s and alice's later requests are refused. Each page's screenshot is kept under
``var/artefacts/walkthrough/`` (or ``SPE_WALKTHROUGH_SHOTS``; point it at docs/img/walkthrough
to refresh the page's images).

Needs root, bubblewrap, nftables, the proxy and the workspace runtime (like
tests/integration/test_hub_keycloak.py), Chromium (apt chromium) and Playwright for Python.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.auth.models import WorkspaceGrant
from spe.auth.principal import SYSTEM
from spe.config import Settings
from spe.datasets.bundled import ensure_demo_dataset
from spe.db import Database
from tests.e2e import walkthrough_steps as steps
from tests.e2e.console import ensure_console_realm
from tests.e2e.stack import REPO, Stack
from tests.integration.test_hub_keycloak import _database
from tests.integration.test_hub_keycloak import pytestmark as hub_marks
from tests.keycloak_fixtures import password_of
from workspaces.lifecycle import server_name

CHROMIUM = os.environ.get("SPE_TEST_CHROMIUM") or shutil.which("chromium") or ""
SHOTS = Path(os.environ.get("SPE_WALKTHROUGH_SHOTS") or REPO / "var" / "artefacts"
             / "walkthrough")
PERSONS = 5000  # the bundled generator, smaller than `spe up`'s 20,000 (same code path)
STOP_WITHIN_S = 10.0
pytestmark = [*hub_marks, pytest.mark.timeout(600), pytest.mark.skipif(
    not CHROMIUM or not __import__("importlib").util.find_spec("playwright"),
    reason="needs Chromium (apt chromium) and Playwright for Python (scripts/setup.sh)")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keycloak_url: str,
          keycloak_admin: Any) -> Iterator[Stack]:
    ensure_console_realm(keycloak_admin)
    tmp = tmp_path_factory.mktemp("walkthrough")
    gen = _database(tmp)
    url = next(gen)
    st = Stack(data_dir=tmp / "var", database_url=url, keycloak_url=keycloak_url,
               extra_env={"SPE_WS_GPU_INDICES": "[0]"})
    st.data_dir.mkdir()
    db = Database(url)
    db.upgrade()
    ensure_demo_dataset(Settings(data_dir=st.data_dir, database_url=url), db,
                        persons=PERSONS, principal=SYSTEM)
    db.dispose()
    try:
        st.start_api()
        st.start_hub()
        yield st
    finally:
        st.stop()
        with contextlib.suppress(StopIteration):
            next(gen)


@dataclass
class Walk:
    """What the steps share: the stack, the browser, the people's pages, what was made."""

    stack: Stack
    browser: Any
    client_headers: Callable[[str], dict[str, str]]
    user_headers: Callable[[str], dict[str, str]]
    pages: dict[str, Any] = field(default_factory=dict)
    made: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def shot(self, who: str, name: str) -> None:
        assert name in SHOT_NAMES, f"{name} is not a screenshot the walkthrough names"
        # export requests whole, checks to votes (the lab scrolls inside its own panels)
        self.pages[who].screenshot(path=str(SHOTS / f"{name}.png"),
                                   full_page=name in WHOLE_PAGES)

    def person(self, who: str) -> Any:
        if who not in self.pages:
            context = self.browser.new_context(viewport={"width": 1280, "height": 800})
            self.pages[who] = context.new_page()
        return self.pages[who]

    def console_login(self, who: str) -> Any:
        page = self.person(who)
        page.goto(f"{self.stack.api_url}/console")
        page.fill("#username", who)
        page.fill("#password", password_of(who))
        page.click("#kc-login")
        page.wait_for_url(f"{self.stack.api_url}/console")
        return page

    def hub_api(self, method: str, path: str) -> Any:
        """A hub REST call from alice's browser (her cookies and the hub's XSRF token)."""
        page = self.pages["alice"]
        xsrf = next((c["value"] for c in page.context.cookies(self.stack.hub_url)
                     if c["name"] == "_xsrf" and c["path"] == "/hub/"), "")
        return page.context.request.fetch(f"{self.stack.hub_url}{path}", method=method,
                                          headers={"X-XSRFToken": xsrf})

    def server(self) -> dict[str, Any] | None:
        r = self.hub_api("GET", "/hub/api/users/alice")
        assert r.status == 200, r.text()
        return r.json()["servers"].get(self.made["server"])  # type: ignore[no-any-return]


SHOT_NAMES = {s.name for step in steps.STEPS for s in step.shots}
WHOLE_PAGES = {"console-dp-released", "console-small-count", "console-rejected"}


def _permit(w: Walk) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    body = steps.permit_body((now - timedelta(days=1)).isoformat(),
                             (now + timedelta(days=180)).isoformat())
    r = httpx.post(f"{w.stack.api_url}/v1/permits", json=body, timeout=60,
                   headers=w.client_headers("hdab-alpha"))
    assert r.status_code == 201, r.text
    w.made["permit"] = pid = str(r.json()["id"])
    w.made["server"] = server_name(pid)


def _login(w: Walk) -> None:
    page = w.person("alice")
    hub = w.stack.hub_url
    page.goto(f"{hub}/hub/login")
    page.click("a:has-text('Sign in with SPE (Keycloak)')")
    page.locator("#kc-form-login").wait_for()
    page.fill("#username", "alice")
    page.fill("#password", password_of("alice"))
    w.shot("alice", "keycloak-login")
    page.click("#kc-login")
    page.wait_for_url(f"{hub}/hub/**")
    page.goto(f"{hub}/hub/home")
    assert "alice" in page.inner_text("body")
    w.shot("alice", "hub-home")


def _start(w: Walk) -> None:
    page, pid, name = w.pages["alice"], w.made["permit"], w.made["server"]
    page.click("#start")
    link = page.locator(f"a[href$='/hub/spawn/alice/{name}']")
    link.wait_for(timeout=30_000)
    assert steps.PERMIT["reference"] in link.inner_text()
    assert not page.locator("#spawn_form button[type=submit]").is_visible()  # nothing to start
    w.shot("alice", "spawn-permits")
    link.click()
    page.locator("#permit").wait_for(timeout=30_000)
    assert pid in page.inner_text("#permit")
    w.shot("alice", "spawn-form")
    t0 = time.monotonic()
    page.click("button[type=submit]:has-text('Start')")
    launcher = page.locator(".jp-LauncherCard", has_text="Python 3").first
    launcher.wait_for(timeout=180_000)
    w.timings["spawn_to_lab_s"] = time.monotonic() - t0
    assert page.url.startswith(w.stack.workspace_url("alice", name)), page.url
    w.shot("alice", "lab")
    launcher.click()
    page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(timeout=120_000)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)


def _run_cell(w: Walk, key: str, expect: tuple[str, ...], timeout: float = 120.0) -> str:
    """Type cell ``key`` of the walkthrough into the last cell, run it, wait for its output."""
    page = w.pages["alice"]
    cells = page.locator(".jp-Notebook .jp-Cell")
    cell = cells.nth(cells.count() - 1)
    cell.locator(".cm-content").click()
    page.keyboard.insert_text(steps.CELLS[key])
    t0 = time.monotonic()
    page.keyboard.press("Shift+Enter")
    output = cell.locator(".jp-OutputArea")
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = output.inner_text() if output.count() else ""
        prompt = cell.locator(".jp-InputArea-prompt").inner_text()
        if "Traceback" in text or "Error" in text or (
                all(e in text for e in expect) and "*" not in prompt):
            break
        time.sleep(0.5)
    w.timings[f"cell_{key}_s"] = time.monotonic() - t0
    cell.scroll_into_view_if_needed()
    assert all(e in text for e in expect), (key, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    assert "Fontconfig error" not in text, text[-3000:]
    return text


def _client(w: Walk) -> None:
    out = _run_cell(w, "client", ("gender_concept_id", "cost: epsilon 0.5", "epsilon spent 0.5"))
    assert "95% CI" in out
    w.shot("alice", "notebook-client")


def _magic(w: Walk) -> None:
    out = _run_cell(w, "magic", ("concept_name", "cost: epsilon 0.5", "budget left: epsilon 4"))
    assert "refused" not in out
    cells = w.pages["alice"].locator(".jp-Notebook .jp-Cell")
    rows = cells.nth(cells.count() - 2).locator(".jp-OutputArea-output table tbody tr")
    assert rows.count() >= 3, out  # the names of the commonest conditions survive the noise
    w.shot("alice", "notebook-magic")


def _plot(w: Walk) -> None:
    _run_cell(w, "plot", ())
    page = w.pages["alice"]
    cells = page.locator(".jp-Notebook .jp-Cell")
    image = cells.nth(cells.count() - 2).locator(".jp-OutputArea-output img")
    image.wait_for(timeout=60_000)
    assert image.evaluate("i => i.complete && i.naturalWidth") > 100
    w.shot("alice", "notebook-plot")


def _ray(w: Walk) -> None:
    out = _run_cell(w, "ray", ("'GPU': 1.0", "'CPU': 1.0"), timeout=240)
    assert out.count("['0']") == 3  # each task ran on the allocated (logical) GPU 0
    w.shot("alice", "notebook-ray")


def _export(w: Walk) -> None:
    out = _run_cell(w, "export", ("by_gender.csv: released", "site_counts.csv: in_review"))
    assert out
    w.shot("alice", "notebook-export")
    r = httpx.get(f"{w.stack.api_url}/v1/permits/{w.made['permit']}/exports", timeout=60,
                  headers=w.user_headers("hadmin"))
    assert r.status_code == 200, r.text
    by_name = {i["files"][0]["name"]: i for i in r.json()["items"]}
    w.made["dp_export"] = by_name["by_gender.csv"]["id"]
    w.made["small_export"] = by_name["site_counts.csv"]["id"]


def _review(w: Walk) -> None:
    pid, base = w.made["permit"], w.stack.api_url
    dp_id, small_id = w.made["dp_export"], w.made["small_export"]
    page = w.console_login("hadmin")
    page.goto(f"{base}/console/permits/{pid}")
    exports = page.locator("table", has_text="export requests").inner_text()
    assert dp_id[:12] in exports and small_id[:12] in exports
    assert "released" in exports and "in review" in exports
    page.goto(f"{base}/console/permits/{pid}/exports/{dp_id}")
    main = page.inner_text("main")
    assert "released" in page.inner_text("dl.facts") and "dp_receipt" in main
    w.shot("hadmin", "console-dp-released")
    page.goto(f"{base}/console/exports")
    queue = page.inner_text("main")
    assert small_id[:12] in queue and dp_id[:12] not in queue
    w.shot("hadmin", "console-queue")
    page.click(f"a:has-text('{small_id[:12]}')")
    page.wait_for_url(f"{base}/console/permits/{pid}/exports/{small_id}")
    assert page.locator("tr.failed").count() >= 1
    assert "below 10" in page.locator("td.small-cell").first.inner_text()
    page.check("#d-reject")
    page.fill("#comment", "A count below 10 could identify patients: please aggregate.")
    page.check("#shared")
    page.click("button:has-text('Send vote')")
    page.wait_for_url(f"{base}/console/permits/{pid}/exports/{small_id}")
    facts = page.inner_text("dl.facts")
    assert "1 of 2" in facts and "in review" in facts.replace("_", " ")
    w.shot("hadmin", "console-small-count")
    second = w.console_login("hadmin2")
    second.goto(f"{base}/console/permits/{pid}/exports/{small_id}")
    assert "could identify patients" not in second.inner_text("main")  # hidden until voted
    second.check("#d-reject")
    second.click("button:has-text('Send vote')")
    second.wait_for_url(f"{base}/console/permits/{pid}/exports/{small_id}")
    assert "rejected" in second.inner_text("dl.facts")
    w.shot("hadmin2", "console-rejected")


def _audit(w: Walk) -> None:
    pid, base = w.made["permit"], w.stack.api_url
    page = w.pages["hadmin"]
    page.goto(f"{base}/console/permits/{pid}")
    page.click("text=This permit's audit trail")
    trail = page.inner_text("main")
    for action in ("permit.issue", "workspace.spawn", "dp.query", "airlock.vote"):
        assert action in trail, (action, trail[-3000:])
    w.shot("hadmin", "console-audit-trail")
    page.goto(f"{base}/console/audit")
    page.click("text=Verify the hash chain now")
    assert "Intact" in page.inner_text("main")
    w.shot("hadmin", "console-chain-verified")


def _stopped(stack: Stack, pid: str) -> bool:
    """Whether the spawner recorded the permit's server stopped (sandbox torn down)."""
    with Database(stack.database_url).read() as s:
        return s.execute(select(AuditEntry.seq).where(
            AuditEntry.action == "workspace.stop", AuditEntry.permit_id == pid)).first() \
            is not None


def _revoke(w: Walk) -> None:
    pid, api = w.made["permit"], w.stack.api_url
    assert (w.server() or {}).get("ready")
    t0 = time.monotonic()
    r = httpx.post(f"{api}/v1/permits/{pid}/revoke", json={"reason": "project ended"},
                   headers=w.client_headers("hdab-alpha"), timeout=60)
    assert r.status_code == 200, r.text
    while ((w.server() is not None or not _stopped(w.stack, pid))
           and time.monotonic() - t0 < 30):
        time.sleep(0.2)
    w.timings["revoke_to_stopped_s"] = stopped = time.monotonic() - t0
    assert stopped <= STOP_WITHIN_S, (stopped, w.stack.hub.log_tail() if w.stack.hub else "")
    with Database(w.stack.database_url).read() as s:
        grants = list(s.execute(select(WorkspaceGrant).where(
            WorkspaceGrant.permit_id == pid)).scalars())
    assert grants and all(g.revoked_at is not None for g in grants)
    # every later use of the permit by alice is refused at the API (with her Keycloak token:
    # the workspace's tokens are revoked above); what happened stays readable to her
    alice = w.user_headers("alice")
    sql = "SELECT COUNT(*) AS n FROM person"
    uses = {"query": ("POST", "queries", {"sql": sql, "epsilon": 0.1}),
            "dry run": ("POST", "queries", {"sql": sql, "epsilon": 0.1, "dry_run": True}),
            "new export": ("POST", "exports", {"justification": "after the end",
                                               "receipts": []}),
            "revise export": ("POST", f"exports/{w.made['small_export']}/revise", None)}
    refused = {}
    for what, (method, path, body) in uses.items():
        resp = httpx.request(method, f"{api}/v1/permits/{pid}/{path}", json=body,
                             headers=alice, timeout=60)
        refused[what] = resp.status_code
    assert all(code in (401, 403, 404, 409) for code in refused.values()), refused
    budget = httpx.get(f"{api}/v1/permits/{pid}/budget", headers=alice, timeout=60)
    assert budget.status_code == 200 and budget.json()["queries"] == 2, budget.text
    w.made["refused"] = refused
    # ... the hub (no workspace offered, a start refused) and the workspace's origin.
    page, name = w.pages["alice"], w.made["server"]
    page.goto(f"{w.stack.hub_url}/hub/spawn/alice")
    assert "named in no active permit" in page.inner_text("body")
    assert not page.locator("#spawn_form button[type=submit]").is_visible()
    w.shot("alice", "hub-after-revoke")
    start = w.hub_api("POST", f"/hub/api/users/alice/servers/{name}")
    assert start.status in (400, 403, 404), (start.status, start.text())
    gone = page.goto(f"{w.stack.workspace_url('alice', name)}/api/contents")
    assert gone is None or gone.status >= 400, (gone.status, page.content()[:500])


ACTIONS: dict[str, Callable[[Walk], None]] = {
    "permit": _permit, "login": _login, "start": _start, "client": _client, "magic": _magic,
    "plot": _plot, "ray": _ray, "export": _export, "review": _review, "audit": _audit,
    "revoke": _revoke,
}


def test_actions_are_the_tested_steps() -> None:
    assert tuple(ACTIONS) == steps.TESTED


def test_walkthrough(stack: Stack, client_headers: Callable[[str], dict[str, str]],
                     user_headers: Callable[[str], dict[str, str]]) -> None:
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        walk = Walk(stack, browser, client_headers, user_headers)
        try:
            for key in steps.TESTED:
                t0 = time.monotonic()
                try:
                    ACTIONS[key](walk)
                except Exception:
                    for who, page in walk.pages.items():  # what each person saw, for the log
                        with contextlib.suppress(Exception):
                            page.screenshot(path=str(SHOTS / f"failed-{key}-{who}.png"))
                    raise
                walk.timings[f"step_{key}_s"] = time.monotonic() - t0
        finally:
            browser.close()
    walk.timings["total_s"] = time.monotonic() - t_start
    print("\nwalkthrough timings: " + ", ".join(f"{k} {v:.1f}"
                                                for k, v in walk.timings.items()))
    print("refused after revocation (HTTP status):", walk.made["refused"])
    missing = sorted(n for n in SHOT_NAMES if not (SHOTS / f"{n}.png").is_file())
    assert not missing, missing
