"""The researcher's side in JupyterLab, in headless Chromium (issue 15).

A real JupyterLab from the workspace runtime (with the prebuilt SPE extension and the server
extension its configuration enables) talks to a real uvicorn-served SPE API with a workspace
token from the token file. The browser opens the SPE panel (permit reference, datasets and
columns, budget), requests the export of a file from the file browser's context menu (the
justification dialog, then the request's state in the panel), sees the recent queries with
their cost and the spending plot, sees the request released after two hospital admins
approve it through the API (with the comment they shared), runs a ``%%dp`` cell in a new
notebook and sees the budget follow, and the workspace token appears
in no page, no local or session storage and no request the browser makes. Screenshots are kept
under var/screenshots/lab/.

Needs Keycloak, Chromium (apt chromium), Playwright for Python, the workspace runtime and the
extension built by scripts/setup.sh.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from spe.client import Client
from tests.e2e.stack import REPO
from tests.integration.test_dp_api import (  # noqa: F401 - fixtures used by name
    SQL,
    Permits,
    api_settings,
    dataset,
    omop_source,
)
from tests.integration.test_workspace_labserver import (  # noqa: F401 - fixtures used by name
    RUNTIME,
    _start_lab,
    current_runtime,
    permit,
)
from workspaces import runtime

CHROMIUM = os.environ.get("SPE_TEST_CHROMIUM") or shutil.which("chromium") or ""
SHOTS = REPO / "var" / "screenshots" / "lab"
pytestmark = [
    pytest.mark.keycloak, pytest.mark.timeout(600),
    pytest.mark.skipif(not CHROMIUM or not importlib.util.find_spec("playwright"),
                       reason="needs Chromium (apt chromium) and Playwright for Python"),
    pytest.mark.skipif(not (RUNTIME / "share" / "jupyter" / "labextensions"
                            / runtime.LABEXTENSION_NAME / "package.json").is_file(),
                       reason="the JupyterLab extension is built by scripts/setup.sh (npm)"),
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox"])
        yield browser
        browser.close()


def test_panel_and_request_export(permit: tuple[Permits, str, str],  # noqa: F811
                                  server_url: str,
                                  user_headers: Any, chromium: Any, tmp_path: Path) -> None:
    _permits, pid, token = permit
    Client(server_url, token, pid).sql(SQL, epsilon=0.2)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with _start_lab(tmp_path, server_url, pid, token, app="jupyter-lab") as lab:
        (lab.root / "table.csv").write_text("group,n\na,120\nb,135\n")
        context = chromium.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        seen: list[str] = []

        def record(request: Any) -> None:
            seen.append(request.url + "\n" + repr(request.headers) + "\n"
                        + (request.post_data or ""))

        page.on("request", record)
        page.goto(f"{lab.url}/lab?token={lab.login}", wait_until="domcontentloaded")
        tab = page.locator('li[data-id="spe-workspace-panel"]')
        tab.wait_for(timeout=120_000)
        tab.click()
        panel = page.locator("#spe-workspace-panel")
        panel.get_by_text("LAB/0015/2026/FI").wait_for(timeout=60_000)
        text = panel.inner_text()
        assert "PERMIT" in text.upper() and "dpdemo" in text and "gender_concept_id" in text
        assert "Epsilon left" in text and "0.800 of 1" in text
        assert "None yet" in text  # no export request so far
        assert "epsilon 0.2 (released)" in panel.locator('[data-spe="queries"]').inner_text()
        assert panel.locator('[data-spe="spending-plot"] path').count() == 1
        page.screenshot(path=str(SHOTS / "panel.png"))

        # Request export from the file browser's context menu; the panel then shows it.
        page.locator('li[data-id="filebrowser"]').click()
        page.locator('.jp-DirListing-item[title*="table.csv"]').first.click(button="right")
        page.locator(".lm-Menu-itemLabel", has_text="Request export").click()
        dialog = page.locator(".jp-Dialog")
        dialog.locator("input").fill("Table 1 of the paper")
        page.screenshot(path=str(SHOTS / "request-export.png"))
        dialog.locator(".jp-mod-accept").click()
        page.locator(".jp-Dialog", has_text="Export requested").wait_for(timeout=60_000)
        page.locator(".jp-Dialog .jp-mod-accept").click()
        state = panel.locator('[data-spe="export-state"]').first
        state.wait_for(timeout=60_000)
        assert "table.csv" in panel.inner_text()
        assert "in_review" in state.inner_text()
        # Each file shows its check outcome.
        assert "table.csv: " in panel.locator('[data-spe="export-file"]').first.inner_text()
        page.screenshot(path=str(SHOTS / "export-requested.png"))

        # Two hospital admins approve through the API; the panel shows the decision and the
        # comment they shared.
        [request] = httpx.get(f"{server_url}/v1/permits/{pid}/exports", timeout=60,
                              headers=user_headers("alice")).json()["items"]
        for admin, comment in (("hadmin", "Aggregated, fine."), ("hadmin2", None)):
            r = httpx.post(f"{server_url}/v1/permits/{pid}/exports/{request['id']}/votes",
                           json={"decision": "approve", "comment": comment, "shared": True},
                           headers=user_headers(admin), timeout=60)
            assert r.status_code == 200, r.text
        panel.locator('[data-spe="refresh"]').click()
        panel.locator('[data-spe="export-state"]', has_text="released").wait_for(
            timeout=60_000)
        assert "Reviewer (approve): Aggregated, fine." in panel.inner_text()
        page.screenshot(path=str(SHOTS / "export-released.png"))

        # A %%dp cell in a new notebook (the magic is loaded in every kernel): the noisy table,
        # its cost, and the panel's budget follows.
        page.locator(".jp-LauncherCard", has_text="Python 3").first.click()
        editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
        editor.wait_for(timeout=120_000)
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=120_000)
        editor.click()
        page.keyboard.type("%%dp --epsilon 0.3\n" + SQL)
        page.keyboard.press("Shift+Enter")
        output = page.locator(".jp-OutputArea-output", has_text="cost: epsilon 0.3")
        try:
            output.wait_for(timeout=60_000)
        finally:
            page.screenshot(path=str(SHOTS / "notebook-dp-cell.png"))
        assert "gender_concept_id" in page.locator(".jp-OutputArea").first.inner_text()
        panel.locator('[data-spe="refresh"]').click()
        panel.get_by_text("0.500 of 1").wait_for(timeout=60_000)
        assert panel.locator('[data-spe="queries"] li').count() == 2
        page.screenshot(path=str(SHOTS / "notebook-dp-cell.png"))

        # The workspace token is in no page, storage or request.
        storage = page.evaluate("() => JSON.stringify([Object.entries(localStorage), "
                                "Object.entries(sessionStorage), document.cookie])")
        for text in [page.content(), storage, *seen]:
            assert token not in text
        assert not any(u.startswith(server_url) for u in seen)  # the API is never asked
        context.close()
