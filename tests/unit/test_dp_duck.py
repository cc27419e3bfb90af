"""The DuckDB connection the engine uses is locked down even if SQL somehow reached it."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from spe.config import Settings
from spe.dp import duck
from spe.dp.testing import make_dataset


def test_connection_locked_down(tmp_path: Path) -> None:
    path = tmp_path / "d.duckdb"
    make_dataset(path, persons=20)
    (tmp_path / "x.csv").write_text("a\n1\n")
    settings = Settings(data_dir=tmp_path / "var", duckdb_threads=1,
                        duckdb_memory_limit="256MB")
    con = duck.connect(path, settings)
    for sql in (f"SELECT * FROM read_csv('{tmp_path / 'x.csv'}')",
                "SET enable_external_access = true", "SET lock_configuration = false",
                "INSTALL httpfs", "CREATE TABLE t AS SELECT 1",
                f"COPY person TO '{tmp_path / 'out.csv'}'",
                f"ATTACH '{tmp_path / 'other.duckdb'}' AS o"):
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1  # type: ignore[index]
    assert duck.run(con, "SELECT COUNT(*) FROM person", 5.0)[0][0] == 20
    with pytest.raises(duck.QueryTimeout):
        duck.run(con, "SELECT COUNT(*) FROM range(100000000000) a", 0.2)
    con.close()


def test_pooled_cursors_share_a_locked_instance(tmp_path: Path) -> None:
    path = tmp_path / "d.duckdb"
    make_dataset(path, persons=20)
    settings = Settings(data_dir=tmp_path / "var", duckdb_threads=1,
                        duckdb_memory_limit="256MB")
    try:
        with duck.cursor(path, settings) as cur:
            for sql in ("SET lock_configuration = false", "SET enable_external_access = true",
                        "CREATE TABLE t AS SELECT 1", "INSTALL httpfs"):
                with pytest.raises(duckdb.Error):
                    cur.execute(sql)
            # Temporary objects are local to the cursor and vanish with it.
            cur.execute("CREATE TEMP TABLE scratch AS SELECT 1 AS x")
        with duck.cursor(path, settings) as cur:
            assert cur.execute("SELECT current_setting('lock_configuration')").fetchone()[0]  # type: ignore[index]
            with pytest.raises(duckdb.Error):
                cur.execute("SELECT * FROM scratch")
            assert duck.run(cur, "SELECT COUNT(*) FROM person", 5.0)[0][0] == 20
            with pytest.raises(duck.QueryTimeout):
                duck.run(cur, "SELECT COUNT(*) FROM range(100000000000) a", 0.2)
        # A re-written file is read afresh (file identity is part of the pool key).
        duck.close_pool()
        path.unlink()
        make_dataset(path, persons=30)
        with duck.cursor(path, settings) as cur:
            assert duck.run(cur, "SELECT COUNT(*) FROM person", 5.0)[0][0] == 30
    finally:
        duck.close_pool()
