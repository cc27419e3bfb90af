"""PDF previews: rasterised by pdftoppm under bubblewrap (scripts in the PDF never run), bad
files refused with a reason. Skipped where poppler-utils or bubblewrap is missing (the
console then says there is no preview)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from spe.airlock import pdf_preview

#: A one-page PDF (a blue rectangle) that runs a script when opened in a PDF viewer.
PDF_WITH_SCRIPT = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R/OpenAction 5 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 100]/Contents 4 0 R>>endobj\n"
    b"4 0 obj<</Length 35>>stream\n0 0 1 rg 20 20 100 50 re f\nendstream endobj\n"
    b"5 0 obj<</S/JavaScript/JS(app.alert(1))>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")

pytestmark = pytest.mark.skipif(pdf_preview.available() is not None,
                                reason="needs pdftoppm (apt poppler-utils) and bwrap")


def test_a_pdf_with_a_script_becomes_a_png() -> None:
    png, why = pdf_preview.first_page_png(PDF_WITH_SCRIPT)
    assert why is None and png is not None
    assert png.startswith(pdf_preview.PNG_MAGIC)
    width = int.from_bytes(png[16:20], "big")
    assert 220 <= width <= 224  # 200 pt at 80 dpi


def test_garbage_and_disguised_files_get_no_preview() -> None:
    for data in (b"%PDF-1.4 not really", b"PK\x03\x04" + b"\0" * 100):
        png, why = pdf_preview.first_page_png(data)
        assert png is None and why == "No preview: the PDF could not be rasterised."


def test_the_sandbox_binds_only_system_folders() -> None:
    binds = pdf_preview._system_binds()
    assert "/usr" in binds and "/home" not in binds and "/root" not in binds


def test_the_rasteriser_runs_as_nobody_without_capabilities(tmp_path: Path) -> None:
    shell = ["/bin/sh", "-c", "id -u; grep -c . /w/marker; cat /root/x 2>&1 || true"]
    (tmp_path / "marker").write_text("only this folder\n")
    done = subprocess.run(pdf_preview.sandboxed(tmp_path, shell), capture_output=True,
                          text=True, timeout=20, check=False)
    lines = done.stdout.splitlines()
    assert lines[0] == "65534" and lines[1] == "1", done.stdout + done.stderr
    assert "No such file" in done.stdout  # /root is not in the sandbox
