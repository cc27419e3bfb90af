"""docs/walkthrough.md is generated from tests/e2e/walkthrough_steps.py, the module the
walkthrough's end-to-end test runs, so the page and the test cannot disagree.

Fails when the checked-in page differs from what the module renders (regenerate it with
``python -m tests.e2e.walkthrough_steps --write``), when a screenshot the page embeds is not
committed under docs/img/walkthrough/, and when the README stops linking the page.
"""

from __future__ import annotations

import re

from tests.e2e import walkthrough_steps as steps

DOCS = steps.DOC.parent


def test_checked_in_page_is_the_generated_one() -> None:
    assert steps.DOC.read_text(encoding="utf-8") == steps.render(), (
        "docs/walkthrough.md differs from tests/e2e/walkthrough_steps.py: run "
        "`python -m tests.e2e.walkthrough_steps --write`")


def test_every_embedded_screenshot_is_committed() -> None:
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", steps.render())
    named = {f"{steps.IMG}/{s.name}.png" for step in steps.STEPS for s in step.shots}
    assert set(embedded) == named and len(named) >= 10
    missing = [p for p in embedded if not (DOCS / p).is_file()]
    assert not missing, missing
    for path in embedded:
        assert (DOCS / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_cells_and_permit_are_on_the_page() -> None:
    page = steps.render()
    for source in steps.CELLS.values():
        assert source in page
    assert '"reference": "0001/2026/FI"' in page
    tested = [s.key for s in steps.STEPS if s.tested]
    assert tested == list(steps.TESTED) and "revoke" in tested
    headings = re.findall(r"^## \d+\. (.+)$", page, re.M)
    assert sum(h.endswith("*(tested)*") for h in headings) == len(tested)


def test_readme_links_the_page() -> None:
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    assert "docs/walkthrough.md" in readme
