"""COUNT(DISTINCT person_id) over a join must not cost time in one person's row count.

The distinct count is computed without row truncation (exact). Over a join of several
truncated person-level tables that is a product of each person's untruncated rows: one person
with 10,000 measurement rows makes a 3-way self-join 10^12 rows, so the query times out when
(and only when) that person is in the data, and "did it fail?" tells whether person 123 has
many rows. Work per person must stay bounded by the declared contribution bounds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spe.config import Settings
from spe.dp.runner import prepare, release
from spe.dp.testing import make_dataset, make_terms

HEAVY = 123
EXTRA = f"""
INSERT INTO _measurement SELECT 10000000 + i, 10000000 + i, {HEAVY}, 3004249,
  DATE '2015-06-01', 1.0 FROM range(10000) t(i);
"""
REMOVE = f"DELETE FROM _measurement WHERE person_id = {HEAVY};"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = Path(tmp_path_factory.mktemp("blowup"))
    meta = make_dataset(base / "with.duckdb", persons=200, extra_sql=EXTRA)
    make_dataset(base / "without.duckdb", persons=200, extra_sql=REMOVE)
    settings = Settings(data_dir=base / "v", query_timeout_seconds=20)
    return meta, base / "with.duckdb", base / "without.duckdb", settings


def test_distinct_over_self_join_is_bounded_per_person(pair) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, without_path, settings = pair
    sql = ("SELECT COUNT(DISTINCT a.person_id) FROM measurement a "
           "JOIN measurement b ON a.person_id = b.person_id "
           "JOIN measurement c ON b.person_id = c.person_id "
           f"WHERE a.person_id = {HEAVY}")
    prepared = prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6)
    for path in (with_path, without_path):
        start = time.monotonic()
        release(prepared, path, settings)  # a QueryTimeout here is the oracle
        assert time.monotonic() - start < 10


def test_distinct_reads_truncated_rows_on_every_path(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A single table read in full would make the answer time grow with one person's rows."""
    import shutil

    import duckdb

    from spe.dp.engine import distinct_sql

    meta, with_path, _without, _settings = pair
    copy = tmp_path / "copy.duckdb"  # the engine holds the original open with its own config
    shutil.copy(with_path, copy)
    con = duckdb.connect(str(copy))
    try:
        for sql in ("SELECT COUNT(DISTINCT person_id) FROM measurement",
                    "SELECT COUNT(DISTINCT m.person_id) FROM measurement m JOIN person p "
                    "ON p.person_id = m.person_id"):
            plan = prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6).plan
            text = distinct_sql(plan, 1)
            assert "_spe_row_rank" in text
            # Without WHERE the count stays exact: every person keeps their rank-1 row.
            got = con.execute(text).fetchone()
            exact = con.execute("SELECT COUNT(DISTINCT person_id) FROM measurement").fetchone()
            assert got == exact
    finally:
        con.close()
