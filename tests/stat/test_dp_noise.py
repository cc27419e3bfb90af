"""Statistical checks: the noise matches the claimed scale, and a distinguisher with a fixed
false-alarm rate cannot tell neighbouring datasets apart better than epsilon allows.

Neighbouring datasets: D, and D plus one person with the maximal contribution (k rows in
the group). The exact statistics come from the engine's SQL on each dataset; the OpenDP
measurement the plan paid for is then sampled many times.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pytest

from spe.dp import mechanisms as mech
from spe.dp.engine import row_stats_sql
from spe.dp.runner import prepare
from spe.dp.testing import make_dataset, make_terms

ADD = """INSERT INTO _measurement SELECT 90000000 + i, 90000000 + i, 999999, 3004249,
  DATE '2015-06-01', 500.0 FROM range(50) t(i);
INSERT INTO _person VALUES (999999, 999999, 8507, 1950);"""


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = Path(tmp_path_factory.mktemp("stat"))
    meta = make_dataset(base / "d.duckdb", persons=300)
    make_dataset(base / "d1.duckdb", persons=300, extra_sql=ADD)
    return meta, base / "d.duckdb", base / "d1.duckdb"


def _stats(sql: str, paths: list[Path], meta, epsilon: float):  # type: ignore[no-untyped-def]
    prepared = prepare(sql, meta, make_terms(meta), epsilon=epsilon, delta=1e-6)
    stats_sql, names = row_stats_sql(prepared.plan)
    out = []
    for p in paths:
        con = duckdb.connect(str(p), read_only=True)
        row = con.execute(stats_sql).fetchone()
        con.close()
        out.append(dict(zip(names, row, strict=True)))
    return prepared, out


@pytest.mark.parametrize(("sql", "role", "stat"), [
    ("SELECT COUNT(*) FROM measurement", "count", "rows"),
    ("SELECT SUM(value_as_number) FROM measurement", "sum", "sum0"),
])
def test_empirical_scale_matches_claim(neighbours, sql: str, role: str, stat: str
                                       ) -> None:  # type: ignore[no-untyped-def]
    meta, d, _ = neighbours
    prepared, (s,) = _stats(sql, [d], meta, epsilon=0.5)
    unit = next(u for u in prepared.cost.units if u.role == role)
    true = int(s[stat])
    n = 2000
    noise = [mech.laplace_release([true], unit)[0] - true for _ in range(n)]
    mean_abs = sum(abs(x) for x in noise) / n
    # Laplace(b): E|X| = b, sd |X| = b; 5 standard errors.
    assert abs(mean_abs - unit.scale) <= 5 * unit.scale / math.sqrt(n)
    assert abs(sum(noise) / n) <= 5 * unit.scale * math.sqrt(2) / math.sqrt(n)


@pytest.mark.parametrize(("sql", "role", "stat"), [
    ("SELECT COUNT(*) FROM measurement", "count", "rows"),
    ("SELECT SUM(value_as_number) FROM measurement", "sum", "sum0"),
])
def test_distinguisher_within_epsilon(neighbours, sql: str, role: str, stat: str
                                      ) -> None:  # type: ignore[no-untyped-def]
    meta, d, d1 = neighbours
    epsilon = 0.5
    prepared, (s0, s1) = _stats(sql, [d, d1], meta, epsilon=epsilon)
    unit = next(u for u in prepared.cost.units if u.role == role)
    t0, t1 = int(s0[stat]), int(s1[stat])
    assert abs(t1 - t0) <= unit.d_in  # the added person moves the statistic by <= d_in
    assert abs(t1 - t0) >= unit.d_in // 2  # ... and the test uses a near-maximal change
    n = 3000
    out0 = sorted(mech.laplace_release([t0], unit)[0] for _ in range(n))
    out1 = [mech.laplace_release([t1], unit)[0] for _ in range(n)]
    alpha = 0.05  # fixed false-alarm rate on D
    cut = out0[int((1 - alpha) * n)]
    fa = sum(x > cut for x in out0) / n
    power = sum(x > cut for x in out1) / n
    # DP: power <= e^eps * false alarm (+ delta = 0). Allow 4 binomial standard errors.
    bound = math.exp(epsilon) * fa
    slack = 4 * math.sqrt(bound * (1 - bound) / n) + 4 * math.sqrt(fa * (1 - fa) / n)
    assert power <= bound + slack, (power, bound, slack)
