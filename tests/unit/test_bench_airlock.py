"""bench/airlock runs end to end on small files and prints seconds and peak RSS per file."""

from __future__ import annotations

import re
import subprocess
import sys


def test_bench_prints_seconds_and_peak_rss() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.airlock", "--mb", "2", "--rows", "500"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "DuckDB RSS MB" in out and "checks RSS MB" in out
    floor = float(re.search(r"nothing run: (\d+) MB", out).group(1))  # type: ignore[union-attr]
    rows = [line.split() for line in out.splitlines() if line.endswith("needs_review")]
    assert len(rows) == 2
    for row in rows:
        duck_rss, checks_rss = float(row[-3]), float(row[-2])
        assert floor <= duck_rss < 2000 and floor <= checks_rss < 2000
