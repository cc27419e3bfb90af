"""One origin per workspace: an attacker's page in one workspace reads nothing of the hub or of
another workspace, in a real browser (headless Chromium through Playwright).

alice holds two permits and runs a workspace for each. In the first she replaces the single-user
server with her own HTTP server (:func:`tests.e2e.attacker.replace_server`) that serves an
attacker's page; the page even answers CORS for anyone. alice (the victim: it could be any
hub user) logs in through Keycloak in Chromium, opens her second workspace (so its cookies
exist), then opens the attacker's page. The page tries to read the hub's API and token page
(fetch with credentials, a frame, a window), the second workspace's contents API and its lab
page: every read fails. The same probe run on the hub's own origin and on the second workspace's
own origin reads them (control: the probe works where the origin allows it). JupyterLab's
file menu offers no Download or Copy Download Link.

Needs Chromium (Debian's ``chromium``) and Playwright for Python, plus what
tests/integration/test_hub_keycloak.py needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spe.db import Database
from tests.e2e.attacker import replace_server
from tests.e2e.stack import Stack
from tests.integration.test_hub_keycloak import _database, _issue, _login, _spawn, _xsrf
from tests.integration.test_hub_keycloak import pytestmark as hub_marks
from tests.integration.test_permit_service import register_dataset
from tests.keycloak_fixtures import password_of

CHROMIUM = os.environ.get("SPE_TEST_CHROMIUM") or shutil.which("chromium") or ""
pytestmark = [*hub_marks, pytest.mark.skipif(
    not CHROMIUM or not __import__("importlib").util.find_spec("playwright"),
    reason="needs Chromium (apt chromium) and Playwright for Python (scripts/setup.sh)")]

#: Tries each read; a read counts only when the body came back. Fetches send the hub's XSRF
#: token when the page has one (the hub's own pages do), as the hub's own scripts would.
PROBE = """
async (t) => {
  const r = {};
  const read = async (url) => {
    try {
      const xsrf = (window.jhdata && window.jhdata.xsrf_token) || "";
      const resp = await fetch(url, {credentials: "include", headers: {"X-XSRFToken": xsrf}});
      const body = await resp.text();
      return {ok: resp.ok, status: resp.status, body: body.slice(0, 20000)};
    } catch (e) { return {ok: false, error: String(e)}; }
  };
  const frame = (url) => new Promise((done) => {
    const f = document.createElement("iframe");
    const finish = () => {
      try { done({ok: true, body: f.contentDocument.documentElement.outerHTML.slice(0, 20000)}); }
      catch (e) { done({ok: false, error: String(e)}); }
    };
    f.onload = finish; setTimeout(finish, 5000);
    f.src = url; document.body.appendChild(f);
  });
  const win = (url) => new Promise((done) => {
    const w = window.open(url);
    setTimeout(() => {
      try { done({ok: true, body: w.document.documentElement.outerHTML.slice(0, 20000)}); }
      catch (e) { done({ok: false, error: String(e)}); }
      try { w.close(); } catch (e) {}
    }, 4000);
  });
  for (const [k, url] of Object.entries(t.fetch || {})) r["fetch " + k] = await read(url);
  for (const [k, url] of Object.entries(t.frame || {})) r["frame " + k] = await frame(url);
  for (const [k, url] of Object.entries(t.window || {})) r["window " + k] = await win(url);
  return r;
}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keycloak_url: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("origins")
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
        with contextlib.suppress(StopIteration):
            next(gen)


def _leaked(result: dict[str, Any], marker: str) -> bool:
    return bool(result.get("ok")) and marker in str(result.get("body", ""))


def test_attacker_page_reads_neither_hub_nor_other_workspace(
        stack: Stack, client_headers: Callable[[str], dict[str, str]], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    alice = _login(stack, "alice")
    headers = client_headers("hdab-alpha")
    pid1, pid2 = _issue(stack, headers, ["alice"]), _issue(stack, headers, ["alice"])
    name1, name2 = _spawn(stack, alice, "alice", pid1), _spawn(stack, alice, "alice", pid2)
    ws1, ws2 = stack.workspace_url("alice", name1), stack.workspace_url("alice", name2)
    assert ws1.split("/user/")[0] != ws2.split("/user/")[0] != stack.hub_url
    page1 = alice.get(f"{stack.hub_url}/user/alice/{name1}/lab")
    assert page1.status_code == 200 and str(page1.url).startswith(ws1)
    replace_server(stack, alice, name1, pid1, ws1, {"page.html": b"<html><body>attacker"
                                                    b"</body></html>"},
                   _xsrf(alice, f"/user/alice/{name1}/"))
    # alice's second workspace holds a file only she should read
    page2 = alice.get(f"{stack.hub_url}/user/alice/{name2}/lab")
    assert page2.status_code == 200
    r = alice.request("PUT", f"{ws2}/api/contents/secret.txt", headers=_xsrf(
        alice, f"/user/alice/{name2}/"), json={"type": "file", "format": "text",
                                               "content": "row-level secret"})
    assert r.status_code in (200, 201), r.text

    targets = {
        "fetch": {"hub api": f"{stack.hub_url}/hub/api/user",
                  "hub token page": f"{stack.hub_url}/hub/token",
                  "other workspace contents": f"{ws2}/api/contents/secret.txt?content=1",
                  "other workspace lab": f"{ws2}/lab"},
        "frame": {"hub home": f"{stack.hub_url}/hub/home",
                  "other workspace": f"{ws2}/api/contents/secret.txt?content=1"},
        "window": {"hub token page": f"{stack.hub_url}/hub/token",
                   "other workspace": f"{ws2}/api/contents/secret.txt?content=1"},
    }
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            ctx = browser.new_context()
            page = ctx.new_page()
            page.goto(f"{stack.hub_url}/hub/oauth_login")
            page.fill("#username", "alice")
            page.fill("#password", password_of("alice"))
            page.click("#kc-login")
            page.wait_for_url(f"{stack.hub_url}/hub/**")
            # the victim's second workspace is open (its cookies exist in this browser)
            page.goto(f"{stack.hub_url}/user/alice/{name2}/lab", wait_until="domcontentloaded")
            assert page.url.startswith(ws2), page.url
            # control: on its own origin the probe reads the workspace's file
            own = page.evaluate(PROBE, {"frame": {"contents": targets["frame"][
                "other workspace"]}})
            assert _leaked(own["frame contents"], "row-level secret"), own
            # JupyterLab offers no download commands: the file's context menu has none
            item = page.locator(".jp-DirListing-item", has_text="secret.txt")
            item.wait_for(timeout=90_000)
            item.click(button="right")
            menu = page.locator(".lm-Menu").first
            menu.wait_for()
            entries = menu.inner_text()
            page.screenshot(path=str(tmp_path / "lab-menu.png"))
            assert "Rename" in entries, entries  # the menu is the file's
            assert "Download" not in entries and "Copy Download Link" not in entries, entries
            page.keyboard.press("Escape")
            # control: on the hub's origin the probe reads the hub's API and token page
            page.goto(f"{stack.hub_url}/hub/home")
            hub_own = page.evaluate(PROBE, {"fetch": {k: v for k, v in targets["fetch"].items()
                                                      if k.startswith("hub")}})
            assert _leaked(hub_own["fetch hub api"], "alice"), hub_own
            assert _leaked(hub_own["fetch hub token page"], "alice"), hub_own

            # the attacker's page, opened through the hub like any workspace link
            page.goto(f"{stack.hub_url}/user/alice/{name1}/attack")
            assert page.url.startswith(ws1), page.url  # never on the hub's origin
            assert "attacker" in page.content()
            results = page.evaluate(PROBE, targets)
            page.screenshot(path=str(tmp_path / "attacker.png"))
        finally:
            browser.close()
    print("\n" + json.dumps({k: {"ok": v.get("ok"), "status": v.get("status"),
                                 "error": v.get("error", "")[:60]}
                             for k, v in results.items()}, indent=1))
    assert len(results) == 8
    for what, result in results.items():
        for marker in ("alice", "row-level secret", "token"):
            assert not _leaked(result, marker), (what, result)
