"""Row ranks drawn at ingest, for CSV and Parquet sources.

From Parquet, ranks are drawn over the row number and person only and joined back to the rows
by row number; from CSV, over whole rows in one window. Either way every person's rows hold a
uniformly random permutation of 1..n, stored in rank order, and a bad key in a ranked table is
still named by its file, line and column.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest
from spe.db import Database
from tests.integration.test_ingest_errors import OPERATOR, expect_failure, read, write


@pytest.fixture(scope="module", params=["csv", "parquet"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"omop_ranks_{request.param}")
    generator.generate(out, 600, seed=11, fmt=request.param)
    return request.param, out


@pytest.fixture
def source(pristine: tuple[str, Path], tmp_path: Path) -> tuple[str, Path]:
    fmt, out = pristine
    return fmt, Path(shutil.copytree(out, tmp_path / "src"))


def test_ranks_are_random_permutations_in_stored_order(db: Database, settings: Settings,
                                                       source: tuple[str, Path]) -> None:
    _fmt, src = source
    result = ingest(db, settings, "ranked", src, OPERATOR)
    con = duckdb.connect(str(result.path), read_only=True)
    try:
        for table, key in (("measurement", "measurement_id"),
                           ("visit_occurrence", "visit_occurrence_id")):
            # A permutation of 1..n per person.
            bad = con.execute(
                "SELECT count(*) FROM (SELECT person_id, count(*) n, min(_spe_row_rank) lo, "
                "max(_spe_row_rank) hi, count(DISTINCT _spe_row_rank) d FROM "
                f"{table} GROUP BY person_id) WHERE lo <> 1 OR hi <> n OR d <> n").fetchone()
            assert bad == (0,), table
            # Stored in rank order.
            unordered = con.execute(
                f"SELECT count(*) FROM (SELECT _spe_row_rank r, lag(_spe_row_rank) OVER "
                f"(ORDER BY rowid) p FROM {table}) WHERE r < p").fetchone()
            assert unordered == (0,), table
            # Random, not the file's order: the row with a person's smallest key (written
            # first) gets rank 1 with probability 1/n. A rank in file order (or reversed) is
            # 5+ standard deviations away.
            rows = con.execute(
                f"SELECT count(*) n, arg_min(_spe_row_rank, {key}) = 1 AS first FROM {table} "
                "GROUP BY person_id HAVING count(*) >= 2").fetchall()
            assert len(rows) > 200, table
            excess = sum(float(first) - 1 / n for n, first in rows)
            sd = math.sqrt(sum((1 / n) * (1 - 1 / n) for n, _ in rows))
            assert abs(excess) < 5 * sd, (table, excess, sd)
    finally:
        con.close()


def _set_parquet(path: Path, column: str, row: int, value: object) -> None:
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    values = table.column(column).to_pylist()
    values[row] = value
    pq.write_table(table.set_column(index, column, pa.array(values, pa.int64())), path)


def test_duplicate_key_of_a_ranked_table_is_named(db: Database, settings: Settings,
                                                  source: tuple[str, Path]) -> None:
    fmt, src = source
    if fmt == "csv":
        rows = read(src / "visit_occurrence.csv")
        col = rows[0].index("visit_occurrence_id")
        rows[8][col] = rows[3][col]  # line 9 repeats line 4's key
        write(src / "visit_occurrence.csv", rows)
        where = "visit_occurrence.csv line 9"
    else:
        path = src / "visit_occurrence.parquet"
        first = pq.read_table(path).column("visit_occurrence_id").to_pylist()[2]
        _set_parquet(path, "visit_occurrence_id", 7, first)  # row 8 repeats row 3's key
        where = "visit_occurrence.parquet row 8"
    expect_failure(db, settings, src, where, "column visit_occurrence_id",
                   "duplicate visit_occurrence_id")


def test_missing_key_or_person_of_a_ranked_table_is_named(db: Database, settings: Settings,
                                                          source: tuple[str, Path]) -> None:
    fmt, src = source
    if fmt == "csv":
        rows = read(src / "measurement.csv")
        rows[5][rows[0].index("measurement_id")] = ""
        write(src / "measurement.csv", rows)
        expect_failure(db, settings, src, "measurement.csv line 6", "column measurement_id",
                       "required value is empty")
    else:
        _set_parquet(src / "measurement.parquet", "person_id", 4, None)
        expect_failure(db, settings, src, "measurement.parquet row 5", "column person_id",
                       "required value is empty")


def test_parquet_ranks_linked_tables_like_csv(db: Database, settings: Settings,
                                              tmp_path: Path) -> None:
    """The same export as CSV (ranks over whole rows) and as Parquet (ranks joined by row
    number, behind the links' joins) stores the same rows with the same resolved persons, and
    every person-level table's ranks are a permutation of 1..n per person."""
    from spe.datasets.ingest import _delimited_source, discover
    from spe.datasets.omop_spec import load_spec
    from tests.security.omop_neighbours import write_export

    csv_src = write_export(tmp_path / "csv", True)
    pq_src = tmp_path / "parquet"
    pq_src.mkdir()
    specs = load_spec()
    con = duckdb.connect()
    for sf in discover(csv_src):
        target = str(pq_src / f"{sf.table}.parquet").replace("'", "''")
        con.execute(f"COPY (SELECT * FROM {_delimited_source(sf, specs[sf.table], 'c')}) "
                    f"TO '{target}' (FORMAT parquet)")
    con.close()
    for extra in csv_src.iterdir():
        if extra.suffix not in (".csv", ".parquet"):
            shutil.copy(extra, pq_src / extra.name)
    from_csv = ingest(db, settings, "from-csv", csv_src, OPERATOR)
    from_pq = ingest(db, settings, "from-parquet", pq_src, OPERATOR)
    assert from_pq.metadata.source_format == "parquet"
    linked = [t for t, m in from_pq.metadata.tables.items() if m.kind == "linked"]
    assert linked, "the export declares linked tables"
    a = duckdb.connect(str(from_csv.path), read_only=True)
    b = duckdb.connect(str(from_pq.path), read_only=True)
    try:
        for table, meta in from_pq.metadata.tables.items():
            query = f'SELECT * EXCLUDE (_spe_row_rank) FROM "{table}" ORDER BY ALL' \
                if meta.row_rank_column else f'SELECT * FROM "{table}" ORDER BY ALL'
            assert a.execute(query).fetchall() == b.execute(query).fetchall(), table
            if meta.row_rank_column and meta.privacy_unit:
                unit = meta.privacy_unit
                bad = b.execute(
                    f"SELECT count(*) FROM (SELECT count(*) n, min(_spe_row_rank) lo, "
                    f"max(_spe_row_rank) hi, count(DISTINCT _spe_row_rank) d FROM \"{table}\" "
                    f"GROUP BY {unit}) WHERE lo <> 1 OR hi <> n OR d <> n").fetchone()
                assert bad == (0,), table
    finally:
        a.close()
        b.close()
