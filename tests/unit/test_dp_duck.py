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
    assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1
    assert duck.run(con, "SELECT COUNT(*) FROM person", 5.0)[0][0] == 20
    with pytest.raises(duck.QueryTimeout):
        duck.run(con, "SELECT COUNT(*) FROM range(100000000000) a", 0.2)
    con.close()
