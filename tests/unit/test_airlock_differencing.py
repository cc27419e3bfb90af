"""Differencing in DuckDB: no row bound, the same verdicts as the reference rules in
spe.airlock.sdc.differences, and the flagged cells named for reviewers."""

from __future__ import annotations

import random
import time

import pandas as pd
import pyarrow as pa

from spe.airlock import sdc
from spe.airlock.checks import Context, ReleasedTable, check_differencing

KINDS = frozenset({"csv"})


def ctx(released: list[ReleasedTable]) -> Context:
    return Context(permit_id="p", secret="s" * 40, allowed_kinds=KINDS,
                   released_tables=released)


def _big(rows: int) -> pd.DataFrame:
    rnd = random.Random(7)
    return pd.DataFrame({"region": [f"r{i % 500}" for i in range(rows)],
                         "year": [2000 + i // 500 for i in range(rows)],
                         "n": [rnd.randint(10, 5000) for _ in range(rows)]})


def test_a_table_over_100k_rows_differing_by_one_person_fails() -> None:
    old = _big(150_000)
    new = old.copy()
    new.loc[123_456, "n"] += 1  # one person more in one cell (and the total)
    start = time.perf_counter()
    found = check_differencing(pa.Table.from_pandas(new, preserve_index=False),
                               ctx([ReleasedTable("r1", "big.csv", old)]))
    took = time.perf_counter() - start
    assert found.outcome == "fail", found
    assert found.details["cells"] == 2  # the cell and the column total
    flagged = {(tuple(c["key"]), c["column"], c["delta"]) for c in found.details["flagged"]}
    row = old.loc[123_456]
    assert flagged == {((row["region"], str(row["year"])), "n", 1.0), (("<total>",), "n", 1.0)}
    assert took < 10, took  # a hash join, not Python loops
    far = old.assign(n=old["n"] + 1000)
    ok = check_differencing(pa.Table.from_pandas(far, preserve_index=False),
                            ctx([ReleasedTable("r1", "big.csv", old)]))
    assert ok.outcome == "pass"
    assert ok.details["compared"] == [{"request_id": "r1", "name": "big.csv"}]


def test_same_verdicts_as_the_reference_rules() -> None:
    rnd = random.Random(3)
    for _ in range(40):
        groups = [f"g{i}" for i in range(rnd.randint(1, 6))]
        old = {g: float(rnd.randint(0, 40)) for g in groups}
        new = {g: v + rnd.choice([0, 0, 1, 5, 9, 10, 30]) for g, v in old.items()
               if rnd.random() < 0.9}
        new.update({f"x{i}": float(rnd.randint(0, 20)) for i in range(rnd.randint(0, 2))})
        if not new:
            continue
        reference = sdc.differences({(k,): {"n": v} for k, v in new.items()},
                                    {(k,): {"n": v} for k, v in old.items()})
        old_df = pd.DataFrame({"group": list(old), "n": list(old.values())})
        new_t = pa.table({"group": list(new), "n": list(new.values())})
        got = check_differencing(new_t, ctx([ReleasedTable("r", "f", old_df)]))
        assert got.outcome == ("fail" if reference else "pass"), (old, new)
        if reference:
            assert got.details["cells"] == len(reference)
            assert {(tuple(c["key"]), c["delta"]) for c in got.details["flagged"]} == {
                (d.key, d.delta) for d in reference}


def test_null_keys_match_each_other_and_names_are_quoted() -> None:
    old = pd.DataFrame({'sex "x"': ["F", None], "n": [120, 130]})
    new = pa.table({'sex "x"': ["F", None], "n": [120, 133]})
    got = check_differencing(new, ctx([ReleasedTable("r", "f", old)]))
    assert got.outcome == "fail"
    assert {(tuple(c["key"]), c["delta"]) for c in got.details["flagged"]} == {
        ((None,), 3.0), (("<total>",), 3.0)}
