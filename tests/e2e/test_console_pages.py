"""The console in a real browser: people log in through the real Keycloak (code flow + PKCE)
in headless Chromium (Debian's package, driven by Playwright) and do their work.

* the public register shows the permits without a login and without personal data (page and
  JSON);
* a researcher sees the permits that name them, with budgets, and gets 404 for another permit;
* an access-body officer sees only their access body's permits (404 for another's), opens a
  permit's dashboard (budget plot against the cap, queries per day, versions) and suspends it
  through the confirmation form (the permit service records it, by that officer);
* a form without its CSRF token is refused (403) and audited;
* an export request is reviewed: the queue, the request page with each file's checks (a failed
  check highlighted), two hospital admins approve it independently (the first sees no other
  vote), it is released and the researcher downloads the file and sees the shared comment;
* a hospital admin browses datasets, workspaces and the audit log (filters, next page);
* logout ends the Keycloak session too (the next visit shows Keycloak's login form);
* every HTML page carries the strict Content-Security-Policy and the browser reports no CSP
  violation; each page's screenshot is kept under var/screenshots/console/, and axe-core (from
  the project's npm tree, injected through the DevTools protocol, which the CSP does not govern)
  finds no serious or critical accessibility violation on it (WCAG 2.1 A and AA rules).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from permits.schemas import PermitCreate
from permits.service import get_terms
from spe.airlock import pdf_preview
from spe.airlock.api import airlock_service
from spe.api.app import create_app
from spe.api.deps import permit_service
from spe.audit import AuditAction, AuditEvent, record
from spe.auth.principal import Principal, Role
from spe.budget import ledger
from spe.config import Settings
from spe.db import Database
from tests.e2e.console import ensure_console_realm
from tests.e2e.stack import REPO
from tests.integration.test_permit_service import body, register_dataset
from tests.keycloak_fixtures import password_of
from tests.ports import free_port

CHROMIUM = os.environ.get("SPE_TEST_CHROMIUM") or shutil.which("chromium") or ""
pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(
    not CHROMIUM or not __import__("importlib").util.find_spec("playwright"),
    reason="needs Chromium (apt chromium) and Playwright for Python (scripts/setup.sh)")]

SHOTS = REPO / "var" / "screenshots" / "console"
AXE = REPO / "node_modules" / "axe-core" / "axe.min.js"
AXE_RUN = """async () => {
  const r = await axe.run(document, {runOnly: {type: "tag",
    values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}, resultTypes: ["violations"]});
  return r.violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.length,
    target: v.nodes.map(n => n.target.join(" ")).slice(0, 3)}));
}"""
ALPHA = Principal(subject="a", username="hdab-alpha", kind="service",
                  roles=frozenset({Role.ACCESS_BODY}), access_body="hdab-alpha")
BETA = Principal(subject="b", username="hdab-beta", kind="service",
                 roles=frozenset({Role.ACCESS_BODY}), access_body="hdab-beta")


#: A one-page PDF (a blue rectangle) that runs a script when opened in a PDF viewer.
PDF_WITH_SCRIPT = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R/OpenAction 5 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 100]/Contents 4 0 R>>endobj\n"
    b"4 0 obj<</Length 35>>stream\n0 0 1 rg 20 20 100 50 re f\nendstream endobj\n"
    b"5 0 obj<</S/JavaScript/JS(app.alert(1))>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def _png() -> bytes:
    """A 40x20 grey PNG (a figure a researcher asks to export)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes([120, 120, 120]) * 40 for _ in range(20))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 20, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def officer_password(name: str) -> str:
    return f"{name}-dev-password"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, keycloak_url_module: str
            ) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("console")
    port = free_port()
    settings = Settings(data_dir=tmp / "var", database_url=f"sqlite:///{tmp / 'c.db'}",
                        keycloak_url=keycloak_url_module, api_port=port,
                        public_url=f"http://127.0.0.1:{port}",
                        audit_checkpoint_interval_seconds=0,
                        keycloak_admin_user=os.environ.get("SPE_TEST_KEYCLOAK_ADMIN_USER",
                                                           "admin"),
                        keycloak_admin_password=os.environ.get(
                            "SPE_TEST_KEYCLOAK_ADMIN_PASSWORD", "admin"))
    db = Database(settings.resolved_database_url)
    db.upgrade()
    register_dataset(db)
    app = create_app(settings, db)
    service = permit_service(app.state.spe)
    now = datetime.now(UTC)
    ids = {
        "shared": service.issue(ALPHA, PermitCreate.model_validate(body(
            reference="0001/2026/FI", title="Heart failure cohort",
            valid_from=(now - timedelta(days=6)).isoformat()))).permit_id,
        "carol": service.issue(ALPHA, PermitCreate.model_validate(body(
            reference="0002/2026/FI", title="Carol's own study",
            persons=["carol"]))).permit_id,
        "beta": service.issue(BETA, PermitCreate.model_validate(body(
            reference="B-7/2026", title="Beta registry study",
            persons=["bob"],
            holder={"organisation": "A person", "kind": "natural_person",
                    "principal_investigator": "Dr Private"}))).permit_id,
    }
    ids["exports"] = service.issue(ALPHA, PermitCreate.model_validate(body(
        reference="0003/2026/FI", title="Export study",
        export_policy={"min_cell_count": 10, "allowed_kinds": ["csv", "png", "pdf"],
                       "reviewers": 2}))).permit_id
    airlock = airlock_service(app.state.spe)
    alice = Principal(subject="alice", username="alice", kind="user",
                      roles=frozenset({Role.RESEARCHER}))
    for key, name, data in (("counts", "counts.csv", b"group,count\na,25\nb,31\nc,40\n"),
                            ("small", "small.csv", b"group,count\na,3\nb,31\n"),
                            ("figure", "figure.png", _png()),
                            ("pdf", "methods.pdf", PDF_WITH_SCRIPT)):
        made = airlock.create(alice, ids["exports"], f"figures for the paper ({name})", [])
        airlock.upload(alice, ids["exports"], made["id"], name, data)
        airlock.submit(alice, ids["exports"], made["id"])
        ids[key] = made["id"]
    with db.write() as s:  # a few charged queries over the last days, for the dashboard
        terms = get_terms(s, ids["shared"])
        for i, eps in enumerate((0.5, 0.25, 0.25, 1.0, 0.5)):
            charge = ledger.reserve(s, terms, actor="alice", epsilon=eps, delta=0.0,
                                    plan_hash="0" * 64, sql_sha256=hashlib.sha256(
                                        str(i).encode()).hexdigest())
            charge.created_at = now - timedelta(days=5 - i, hours=i)
        for i in range(60):
            record(s, AuditEvent(action=AuditAction.AUDIT_TEST, actor="op",
                                 details={"i": i}))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/register.json", timeout=2).status_code == 200:
                break
        time.sleep(0.2)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield {"base": base, "db": db, "ids": ids, "settings": settings}
    server.should_exit = True
    thread.join(10)
    db.dispose()


@pytest.fixture(scope="module")
def keycloak_url_module(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("keycloak_url")
    ensure_console_realm(request.getfixturevalue("keycloak_admin"))
    return url


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox"])
        yield browser
        browser.close()


class Visit:
    """One person's browser context: records CSP headers and CSP violations of every page."""

    def __init__(self, chromium: Any, base: str) -> None:
        self.context = chromium.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.base = base
        self.documents: list[tuple[str, dict[str, str]]] = []
        self.violations: list[str] = []
        self.accessibility: list[tuple[str, dict[str, Any]]] = []
        self.page.on("response", self._response)
        self.page.on("console", lambda m: self.violations.append(m.text)
                     if "Content Security Policy" in m.text else None)

    def _response(self, response: Any) -> None:
        if response.request.resource_type == "document" and response.url.startswith(self.base):
            self.documents.append((response.url, response.headers))

    def login(self, username: str, password: str) -> None:
        self.page.goto(f"{self.base}/console")
        self.page.fill("#username", username)
        self.page.fill("#password", password)
        self.page.click("#kc-login")
        self.page.wait_for_url(f"{self.base}/console")

    def open(self, path: str) -> Any:
        return self.page.goto(f"{self.base}{path}")

    def shot(self, name: str) -> Path:
        """Keep the page's screenshot and check it with axe-core."""
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if AXE.is_file():
            self.page.evaluate(AXE.read_text())
            for found in self.page.evaluate(AXE_RUN):
                if found["impact"] in ("serious", "critical"):
                    self.accessibility.append((name, found))
        elif os.environ.get("CI"):
            pytest.fail("axe-core is not installed (npm ci)")
        return path

    def check_headers(self) -> None:
        assert self.documents
        for url, headers in self.documents:
            policy = headers.get("content-security-policy", "")
            assert "default-src 'none'" in policy, url
            assert "script-src" not in policy and "unsafe-inline" not in policy, url
            assert "frame-ancestors 'none'" in policy, url
            assert headers.get("x-content-type-options") == "nosniff", url
        assert self.violations == []
        assert self.accessibility == []

    def close(self) -> None:
        self.context.close()


def _audit(db: Database, action: str) -> list[tuple[str, str, str | None]]:
    from sqlalchemy import select

    from spe.audit.models import AuditEntry

    with db.read() as s:
        return [(r.actor, r.outcome, r.permit_id) for r in s.execute(
            select(AuditEntry).where(AuditEntry.action == action)).scalars()]


def test_register_is_public_and_has_no_personal_data(console: dict[str, Any],
                                                     chromium: Any) -> None:
    visit = Visit(chromium, console["base"])
    response = visit.open("/register")
    assert response.status == 200
    text = visit.page.inner_text("main")
    assert "0001/2026/FI" in text and "Heart failure cohort" in text and "B-7/2026" in text
    for private in ("alice", "bob", "carol", "Dr PI", "Dr Private", "A person"):
        assert private not in text
    visit.shot("register")
    data = httpx.get(f"{console['base']}/register.json").json()
    assert {p["reference"] for p in data["permits"]} == {"0001/2026/FI", "0002/2026/FI",
                                                         "0003/2026/FI", "B-7/2026"}
    dumped = str(data)
    assert "persons" not in dumped and "alice" not in dumped and "Dr PI" not in dumped
    visit.check_headers()
    visit.close()


def test_researcher_sees_own_permits_only(console: dict[str, Any], chromium: Any) -> None:
    ids = console["ids"]
    visit = Visit(chromium, console["base"])
    visit.login("alice", password_of("alice"))
    text = visit.page.inner_text("main")
    assert "0001/2026/FI" in text and "2.5 of 5" in text
    assert "0002/2026/FI" not in text and "B-7/2026" not in text
    visit.shot("researcher-home")
    assert visit.open(f"/console/permits/{ids['shared']}").status == 200
    title = visit.page.locator("svg.plot title").text_content() or ""
    assert title.startswith("Privacy budget spent")
    visit.shot("researcher-permit")
    assert visit.page.locator("a.button").count() == 0  # no actions for researchers
    cookie = next(c for c in visit.context.cookies() if c["name"] == "spe_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    for other in (ids["carol"], ids["beta"]):
        assert visit.open(f"/console/permits/{other}").status == 404
        assert visit.open(f"/console/permits/{other}/suspend").status == 404
    assert visit.open("/console/datasets").status == 404
    # another permit's export request, or a request named under another permit: 404
    assert visit.open(f"/console/permits/{ids['carol']}/exports/{ids['counts']}").status == 404
    assert visit.open(f"/console/permits/{ids['beta']}/exports/{ids['counts']}/files/x"
                      ).status == 404
    visit.check_headers()
    visit.close()


def test_access_body_dashboard_suspend_and_csrf(console: dict[str, Any], chromium: Any) -> None:
    ids, db = console["ids"], console["db"]
    visit = Visit(chromium, console["base"])
    visit.login("officer-alpha", officer_password("officer-alpha"))
    text = visit.page.inner_text("main")
    assert "0001/2026/FI" in text and "0002/2026/FI" in text and "B-7/2026" not in text
    visit.shot("access-body-home")
    assert visit.open(f"/console/permits/{ids['beta']}").status == 404
    assert visit.open(f"/console/permits/{ids['beta']}/suspend").status == 404
    visit.open(f"/console/permits/{ids['shared']}")
    main = visit.page.inner_text("main")
    assert "Queries per day" in main and "issue" in main
    visit.page.click("text=This permit's audit trail")
    trail = visit.page.inner_text("main")
    assert "permit.issue" in trail and ids["beta"] not in trail
    visit.shot("access-body-audit-trail")
    visit.open(f"/console/permits/{ids['shared']}")
    assert visit.page.locator("svg.plot rect.mark").count() == 5
    visit.shot("access-body-dashboard")
    # a form without its CSRF token is refused (the page's cookies, no token)
    refused = visit.page.request.post(
        f"{console['base']}/console/permits/{ids['shared']}/suspend",
        form={"reason": "x", "confirm": "yes"})
    assert refused.status == 403
    assert ("officer-alpha", "refused", None) in _audit(db, "web.refused")
    # suspend through the confirmation form
    visit.page.click("text=Suspend")
    visit.shot("access-body-confirm-suspend")
    visit.page.fill("#reason", "misuse reported by the data holder")
    visit.page.check("#confirm")
    visit.page.click("button:has-text('Suspend permit')")
    visit.page.wait_for_url(f"{console['base']}/console/permits/{ids['shared']}")
    assert "suspended" in visit.page.inner_text("dl.facts")
    visit.shot("access-body-suspended")
    assert ("officer-alpha", "success", ids["shared"]) in _audit(db, "permit.suspend")
    # the other access body cannot act on it either
    other = Visit(chromium, console["base"])
    other.login("officer-beta", officer_password("officer-beta"))
    assert "0001/2026/FI" not in other.page.inner_text("main")
    assert other.open(f"/console/permits/{ids['shared']}").status == 404
    other.close()
    visit.check_headers()
    visit.close()


def test_hospital_admin_pages_and_logout(console: dict[str, Any], chromium: Any) -> None:
    visit = Visit(chromium, console["base"])
    visit.login("hadmin", password_of("hadmin"))
    assert "B-7/2026" in visit.page.inner_text("main")
    visit.shot("admin-home")
    visit.open("/console/datasets")
    assert "demo" in visit.page.inner_text("main")
    visit.shot("admin-datasets")
    visit.open("/console/workspaces")
    assert "No running workspaces" in visit.page.inner_text("main")
    visit.shot("admin-workspaces")
    visit.open("/console/audit")
    first = visit.page.locator("tbody tr").count()
    assert first == 50
    visit.shot("admin-audit")
    visit.page.click("text=Next page")
    assert "cursor=" in visit.page.url
    visit.open("/console/audit?action=audit.test&actor=op")
    assert visit.page.locator("tbody tr").count() == 50
    visit.shot("admin-audit-filtered")
    assert visit.open("/console/audit?since=yesterday").status == 400
    visit.open("/console/audit")
    visit.page.click("text=Verify the hash chain now")
    assert "Intact" in visit.page.inner_text("main")
    visit.shot("admin-audit-verify")
    visit.open("/console")
    visit.page.click("button:has-text('Log out')")
    visit.page.wait_for_url(f"{console['base']}/console/logged-out")
    visit.shot("logged-out")
    visit.open("/console")
    assert visit.page.locator("#kc-form-login").count() == 1  # Keycloak asks again
    assert ("hadmin", "success", None) in _audit(console["db"], "web.logout")
    visit.check_headers()
    visit.close()


def test_export_review_and_download(console: dict[str, Any], chromium: Any) -> None:
    ids, base = console["ids"], console["base"]
    pid = ids["exports"]
    first = Visit(chromium, base)
    first.login("hadmin", password_of("hadmin"))
    first.open("/console/exports")
    queue = first.page.inner_text("main")
    assert all(ids[k][:12] in queue for k in ("counts", "small", "figure"))
    first.shot("admin-export-queue")
    first.open(f"/console/permits/{pid}/exports/{ids['small']}")
    assert first.page.locator("tr.failed").count() >= 1  # cell_counts failed
    small = first.page.locator("td.small-cell")
    assert small.count() == 1 and "below 10" in small.inner_text()  # the cell with count 3
    first.shot("admin-export-failed-check")
    first.open(f"/console/permits/{pid}/exports/{ids['figure']}")
    image = first.page.locator("img.preview")
    assert image.evaluate("i => i.complete && i.naturalWidth") == 40  # served by the SPE
    first.shot("admin-export-image")
    first.open(f"/console/permits/{pid}/exports/{ids['pdf']}")
    if pdf_preview.available() is None:
        page_one = first.page.locator("img.preview")
        # 200x100 pt at 80 dpi, rasterised on the server: the browser never gets the PDF
        assert 220 <= page_one.evaluate("i => i.complete && i.naturalWidth") <= 224
        shown = first.page.request.get(base + (page_one.get_attribute("src") or ""))
        assert shown.headers["content-type"] == "image/png"
        assert "sandbox" in shown.headers["content-security-policy"]
        first.shot("admin-export-pdf")
    else:  # this machine lacks poppler-utils or bubblewrap: the page says so
        assert "No PDF preview" in first.page.inner_text("main")
    shown = first.page.request.get(
        f"{base}/console/permits/{pid}/exports/{ids['figure']}/preview/x")
    assert shown.status == 404
    first.open(f"/console/permits/{pid}/exports/{ids['counts']}")
    assert "counts.csv" in first.page.inner_text("main")
    first.shot("admin-export-request")
    first.page.check("#d-approve")
    first.page.fill("#comment", "fine to publish")
    first.page.check("#shared")
    first.page.click("button:has-text('Send vote')")
    first.page.wait_for_url(f"{base}/console/permits/{pid}/exports/{ids['counts']}")
    assert "1 of 2" in first.page.inner_text("dl.facts")
    first.shot("admin-export-voted")
    first.check_headers()
    first.close()
    second = Visit(chromium, base)
    second.login("hadmin2", password_of("hadmin2"))
    second.open(f"/console/permits/{pid}/exports/{ids['counts']}")
    assert "fine to publish" not in second.page.inner_text("main")  # hidden until they vote
    second.page.check("#d-approve")
    second.page.click("button:has-text('Send vote')")
    second.page.wait_for_url(f"{base}/console/permits/{pid}/exports/{ids['counts']}")
    assert "released" in second.page.inner_text("dl.facts")
    second.check_headers()
    second.close()
    researcher = Visit(chromium, base)
    researcher.login("alice", password_of("alice"))
    researcher.open(f"/console/permits/{pid}/exports/{ids['counts']}")
    assert "fine to publish" in researcher.page.inner_text("main")
    researcher.shot("researcher-export-released")
    with researcher.page.expect_download() as info:
        researcher.page.click("text=Download")
    path = info.value.path()
    assert Path(path).read_bytes() == b"group,count\na,25\nb,31\nc,40\n"
    assert ("alice", "success", pid) in _audit(console["db"], "airlock.download")
    assert researcher.open("/console/exports").status == 404  # the queue is for reviewers
    researcher.check_headers()
    researcher.close()

    # A new table that differs from the released counts.csv by one person: the request page
    # names the earlier release (hash, date) and the flagged cells.
    from spe.airlock.service import AirlockService

    airlock = AirlockService(console["db"], console["settings"])
    alice = Principal(subject="alice", username="alice", kind="user",
                      roles=frozenset({Role.RESEARCHER}))
    again = airlock.create(alice, pid, "figures for the paper (counts, revised)", [])
    airlock.upload(alice, pid, again["id"], "counts-v2.csv", b"group,count\na,26\nb,31\nc,40\n")
    airlock.submit(alice, pid, again["id"])
    third = Visit(chromium, base)
    third.login("hadmin", password_of("hadmin"))
    third.open(f"/console/permits/{pid}/exports/{again['id']}")
    earlier = third.page.locator("table:has(caption:text('Earlier releases of this permit'))")
    assert earlier.count() == 1
    row = earlier.locator("tr.failed")
    assert row.count() == 1 and "counts.csv" in row.inner_text()
    assert "differences flagged" in row.inner_text() and ids["counts"][:8] in row.inner_text()
    flagged = third.page.locator("table.flagged tbody tr")
    assert {tuple(flagged.nth(i).inner_text().split("\t")) for i in range(flagged.count())} == {
        ("a", "count", "+1"), ("<total>", "count", "+1")}
    third.shot("admin-export-differencing")
    third.check_headers()
    third.close()


def test_model_approval_waits_for_the_membership_inference_result(
        console: dict[str, Any], chromium: Any, tmp_path: Path) -> None:
    """A model in review whose membership-inference attack still runs: the reviewer's approve
    is refused on the page with the reason, and counts once the result is stored. SACRO-ML
    needs PyTorch, which cannot be installed here: a stand-in interpreter plays the configured
    attack environment and answers when the test lets it (tests/integration/
    test_airlock_models.py has the runner's own tests)."""
    import stat

    from spe.airlock.service import AirlockService
    from tests.integration.test_airlock_models import GOOD

    ids, base = console["ids"], console["base"]
    pid = ids["exports"]
    go = tmp_path / "go"
    stand_in = tmp_path / "sacroml-python"
    stand_in.write_text(f"#!/bin/sh\ncat >/dev/null\nwhile [ ! -e {go} ]; do sleep 0.05; "
                        "done\necho '{\"outcome\": \"needs_review\", \"summary\": "
                        "\"stand-in attack: AUC 0.51\"}'\n")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    airlock = AirlockService(console["db"], console["settings"].model_copy(update={
        "airlock_sacroml_python": stand_in, "airlock_mia_timeout_seconds": 60.0}))
    alice = Principal(subject="alice", username="alice", kind="user",
                      roles=frozenset({Role.RESEARCHER}))
    name, data = GOOD["onnx"]
    made = airlock.create(alice, pid, "the fitted model", [
        {"evidence": "model", "file": name, "training_rows": 1000}])
    airlock.upload(alice, pid, made["id"], name, data)
    airlock.submit(alice, pid, made["id"])
    page_path = f"/console/permits/{pid}/exports/{made['id']}"
    admin = Visit(chromium, base)
    admin.login("hadmin", password_of("hadmin"))
    try:
        admin.open(page_path)
        assert "MIA queued" in admin.page.inner_text("main")
        admin.page.check("#d-approve")
        admin.page.click("button:has-text('Send vote')")
        assert "has not finished" in admin.page.inner_text("main")
        assert "0 of 2" in admin.page.inner_text("dl.facts")
        admin.shot("admin-export-model-mia-running")
        go.touch()
        for thread in airlock.mia_threads:
            thread.join(timeout=60)
        admin.open(page_path)
        assert "AUC 0.51" in admin.page.inner_text("main")
        admin.page.check("#d-approve")
        admin.page.click("button:has-text('Send vote')")
        admin.page.wait_for_url(f"{base}{page_path}")
        assert "1 of 2" in admin.page.inner_text("dl.facts")
        admin.shot("admin-export-model-mia-done")
        admin.check_headers()
    finally:
        go.touch()
        admin.close()
