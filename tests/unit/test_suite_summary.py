"""The summary that scripts/test.sh prints (tests/suite_summary.py): counts by kind of test,
just before pytest's own closing line, whose exit status is kept (1 on a failure, 5 when no test
ran)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.suite_summary",
                           "-p", "no:cacheprovider", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def _project(tmp_path: Path) -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    fuzz: fuzz tests\n")
    files = {
        "tests/unit/test_a.py": "def test_one():\n    pass\n\ndef test_two():\n    pass\n",
        "tests/security/test_b.py": (
            "import pytest\n\ndef test_bad():\n    assert False\n\n"
            "@pytest.mark.skip(reason='x')\ndef test_skipped():\n    pass\n\n"
            "@pytest.mark.fuzz\ndef test_fuzzed():\n    pass\n"),
        "tests/e2e/test_browser_pages.py": "def test_page():\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_counts_by_kind_before_pytests_closing_line(tmp_path: Path) -> None:
    result = _pytest(_project(tmp_path), "tests")
    assert result.returncode == 1  # a failing test still fails the run
    lines = result.stdout.rstrip().splitlines()
    assert "4 passed" in lines[-1] and "1 failed" in lines[-1]  # pytest's own line is last
    head = next(i for i, line in enumerate(lines) if "what ran, by kind" in line)
    table = {line.split()[0]: line.split()[1:] for line in lines[head + 1:]
             if line.split() and line.split()[0] in
             ("unit", "security", "e2e", "browser", "fuzz")}
    assert table["unit"][:2] == ["2", "passed"]
    assert table["security"] == ["1", "passed", "1", "failed", "1", "skipped"]
    assert table["e2e"][:2] == ["1", "passed"] and table["browser"][:2] == ["1", "passed"]
    assert table["fuzz"][:2] == ["1", "passed"]


def test_no_test_keeps_exit_status_5(tmp_path: Path) -> None:
    result = _pytest(_project(tmp_path), "tests", "-k", "nothing_matches_this")
    assert result.returncode == 5
    assert "no test ran (pytest exit status 5)" in result.stdout
