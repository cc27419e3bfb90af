"""No error depends on the data: dates, timestamps and their conversions.

The probe: DuckDB converts a DATE to a TIMESTAMP implicitly when the two are compared, and the
conversion fails for dates outside the timestamp range (Parquet can store any date, e.g. year
200000, and 'infinity'). A query failing only when one person's out-of-range date is present
would be a noise-free membership bit. Closed twice: ingest refuses dates and timestamps outside
the years 1..9999 (CSV and Parquet alike), and the planner never compares a DATE with a
TIMESTAMP (separate kinds; a refusal at planning, before any data is read).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spe.auth.principal import operator_principal
from spe.config import Settings
from spe.datasets.ingest import ingest
from spe.db import Database
from spe.dp.runner import prepare, release
from spe.dp.testing import make_terms
from spe.errors import IngestError, QueryRefused
from tests.security.omop_neighbours import write_export

OPERATOR = operator_principal("tester")


def _to_parquet(src: Path, table: str, column: str, value: dt.date | None) -> None:
    """Rewrite ``table`` as Parquet with real DATE columns, ``column`` of row 2 set to value."""
    import csv

    path = src / f"{table}.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    path.unlink()
    cols: dict[str, pa.Array] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if name.endswith("_date"):
            dates: list[dt.date | None] = [dt.date.fromisoformat(v) for v in values]
            if name == column:
                dates[1] = value
            cols[name] = pa.array(dates, type=pa.date32())
        elif name.endswith("_id") or name.endswith("_concept_id"):
            cols[name] = pa.array([int(v) for v in values], type=pa.int64())
        else:
            cols[name] = pa.array(values, type=pa.string())
    pq.write_table(pa.table(cols), src / f"{table}.parquet")


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    return sqlite_db


@pytest.mark.parametrize("year", [200000, -5])
def test_parquet_dates_outside_years_1_to_9999_are_refused(tmp_path: Path, db: Database,
                                                           year: int) -> None:
    src = write_export(tmp_path / "src", False)
    # date32 holds days since 1970: far beyond what datetime.date can hold.
    far = dt.date(9999, 12, 31) if year > 0 else dt.date(1, 1, 1)
    _to_parquet(src, "observation_period", "observation_period_start_date", far)
    path = src / "observation_period.parquet"
    table = pq.read_table(path)
    days = 365 * (year - 1970)
    idx = table.schema.get_field_index("observation_period_start_date")
    column = table.column(idx).to_pylist()
    arr = pa.array([(d - dt.date(1970, 1, 1)).days if d else None for d in column],
                   type=pa.int32())
    arr = pa.array([days if i == 1 else v for i, v in enumerate(arr.to_pylist())],
                   type=pa.int32()).cast(pa.date32())
    pq.write_table(table.set_column(idx, "observation_period_start_date", arr), path)
    with pytest.raises(IngestError) as info:
        ingest(db, Settings(data_dir=tmp_path / "var"), "far", src, OPERATOR)
    text = str(info.value)
    assert "observation_period.parquet row 2" in text
    assert "observation_period_start_date" in text and "years 1 to 9999" in text


def test_date_timestamp_mix_is_refused_at_planning_and_literals_work(
        tmp_path: Path, db: Database) -> None:
    src = write_export(tmp_path / "src", False)
    info = ingest(db, Settings(data_dir=tmp_path / "var"), "kinds", src, OPERATOR)
    meta, terms = info.metadata, make_terms(info.metadata)
    for sql in (
        "SELECT COUNT(*) FROM visit_occurrence WHERE visit_start_date > "
        "TIMESTAMP '2020-01-01 10:00:00'",
        "SELECT COUNT(*) FROM visit_occurrence WHERE visit_start_date > visit_end_datetime",
        "SELECT COUNT(*) FROM visit_occurrence WHERE visit_start_date > "
        "'2020-01-01 10:00:00'",
    ):
        with pytest.raises(QueryRefused) as refused:
            prepare(sql, meta, terms, epsilon=1.0, delta=1e-6)
        assert "date" in str(refused.value)
    settings = Settings(data_dir=tmp_path / "var", query_timeout_seconds=20)
    for sql in (
        "SELECT COUNT(*) FROM visit_occurrence WHERE visit_start_datetime > "
        "TIMESTAMP '2020-01-01 10:00:00'",
        "SELECT COUNT(*) FROM visit_occurrence WHERE visit_start_datetime > '2020-01-01'",
        "SELECT COUNT(*) FROM visit_occurrence WHERE visit_start_date >= DATE '2020-01-01' "
        "AND visit_end_datetime < TIMESTAMP '2030-01-01 00:00:00'",
    ):
        prepared = prepare(sql, meta, terms, epsilon=1.0, delta=1e-6)
        out = release(prepared, info.path, settings)
        assert out is not None
