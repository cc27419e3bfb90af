"""Each malformed export names what is wrong (file, line, column) and leaves nothing behind."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from spe.audit.models import AuditEntry
from spe.auth.principal import operator_principal
from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest
from spe.datasets.models import DatasetRecord
from spe.db import Database
from spe.errors import Conflict, IngestError, SPEError

OPERATOR = operator_principal("tester")
SECRET = "SECRET4711"  # a "data value" that must never appear in an error or the audit log


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omop_bad_src")
    generator.generate(out, 120, seed=5, fmt="csv")
    return out


@pytest.fixture
def source(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def read(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def write(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def set_value(path: Path, line: int, column: str, value: str) -> None:
    rows = read(path)
    rows[line - 1][rows[0].index(column)] = value
    write(path, rows)


def assert_nothing_left(db: Database, settings: Settings, name: str, reason: str) -> None:
    store = settings.store_dir
    assert not store.exists() or list(store.iterdir()) == []
    with db.read() as session:
        assert session.execute(select(func.count()).select_from(DatasetRecord)).scalar() == 0
        entries = session.execute(select(AuditEntry).where(
            AuditEntry.action == "dataset.ingest", AuditEntry.target == name)).scalars().all()
    assert [e.outcome for e in entries] == ["failure"]
    assert reason in (entries[0].reason or "")
    assert SECRET not in (entries[0].reason or "") and SECRET not in str(entries[0].details)


def expect_failure(db: Database, settings: Settings, src: Path, *parts: str,
                   error: type[SPEError] = IngestError) -> str:
    with pytest.raises(error) as err:
        ingest(db, settings, "bad", src, OPERATOR)
    detail = err.value.detail
    for part in parts:
        assert part in detail, (part, detail)
    assert SECRET not in detail
    assert_nothing_left(db, settings, "bad", parts[0])
    return detail


def _unknown_column(src: Path) -> tuple[str, ...]:
    rows = read(src / "person.csv")
    for i, row in enumerate(rows):
        row.append("shoe_size" if i == 0 else "42")
    write(src / "person.csv", rows)
    return ("person.csv line 1", "unknown column 'shoe_size'")


def _missing_required(src: Path) -> tuple[str, ...]:
    rows = read(src / "measurement.csv")
    idx = rows[0].index("measurement_concept_id")
    write(src / "measurement.csv", [r[:idx] + r[idx + 1:] for r in rows])
    return ("measurement.csv line 1", "missing required column(s): measurement_concept_id")


def _bad_type(src: Path) -> tuple[str, ...]:
    set_value(src / "measurement.csv", 5, "value_as_number", SECRET)
    return ("measurement.csv line 5", "column value_as_number (DOUBLE)",
            "does not match the column type")


def _bad_date(src: Path) -> tuple[str, ...]:
    set_value(src / "visit_occurrence.csv", 9, "visit_start_date", "2021-13-45")
    return ("visit_occurrence.csv line 9", "column visit_start_date (DATE)")


def _truncated(src: Path) -> tuple[str, ...]:
    path = src / "drug_exposure.csv"
    lines = path.read_text().splitlines()
    cut = lines[-1][: len(lines[-1]) // 3]
    path.write_text("\n".join([*lines[:-1], cut]))
    return (f"drug_exposure.csv line {len(lines)}", "too few fields")


def _too_many_fields(src: Path) -> tuple[str, ...]:
    path = src / "observation_period.csv"
    lines = path.read_text().splitlines()
    lines[3] += ",1,2"
    path.write_text("\n".join(lines) + "\n")
    return ("observation_period.csv line 4", "too many fields")


def _null_required(src: Path) -> tuple[str, ...]:
    set_value(src / "person.csv", 7, "gender_concept_id", "")
    return ("person.csv line 7", "column gender_concept_id", "required value is empty")


def _duplicate_person(src: Path) -> tuple[str, ...]:
    rows = read(src / "person.csv")
    rows[10][0] = rows[3][0]
    write(src / "person.csv", rows)
    return ("person.csv line 11", "column person_id", "duplicate person_id")


def _unknown_table(src: Path) -> tuple[str, ...]:
    (src / "patients.csv").write_text("id\n1\n")
    return ("patients.csv", "not an OMOP CDM 5.4 table")


def _no_person(src: Path) -> tuple[str, ...]:
    (src / "person.csv").unlink()
    return ("the person table is required",)


def _missing_header(src: Path) -> tuple[str, ...]:
    path = src / "death.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))
    return ("death.csv line 1", "is the header missing?")


def _bad_declaration(src: Path) -> tuple[str, ...]:
    (src / "spe-metadata.yaml").write_text(
        "tables:\n  measurement:\n    columns:\n      value_as_number: {lower: 9, upper: 1}\n")
    return ("spe-metadata.yaml", "value_as_number", "lower must not exceed upper")


def _empty_file(src: Path) -> tuple[str, ...]:
    (src / "death.csv").write_text("")
    return ("death.csv", "empty")


CASES: dict[str, Callable[[Path], tuple[str, ...]]] = {
    "unknown_column": _unknown_column, "missing_required": _missing_required,
    "bad_type": _bad_type, "bad_date": _bad_date, "truncated": _truncated,
    "too_many_fields": _too_many_fields, "null_required": _null_required,
    "duplicate_person": _duplicate_person, "unknown_table": _unknown_table,
    "no_person": _no_person, "missing_header": _missing_header,
    "bad_declaration": _bad_declaration, "empty_file": _empty_file,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_export_is_refused(db: Database, settings: Settings, source: Path,
                               case: str) -> None:
    parts = CASES[case](source)
    expect_failure(db, settings, source, *parts)


def test_bad_parquet_value_names_row_and_column(db: Database, settings: Settings,
                                                tmp_path: Path) -> None:
    src = tmp_path / "pq"
    generator.generate(src, 50, seed=1, fmt="parquet")
    table = pq.read_table(src / "person.parquet")
    years = table.column("year_of_birth").to_pylist()
    years_text = [str(y) for y in years]
    years_text[6] = SECRET
    idx = table.schema.get_field_index("year_of_birth")
    table = table.set_column(idx, "year_of_birth", pa.array(years_text))
    pq.write_table(table, src / "person.parquet")
    expect_failure(db, settings, src, "person.parquet row 7", "column year_of_birth (BIGINT)")


def test_bad_name_is_refused(db: Database, settings: Settings, source: Path) -> None:
    with pytest.raises(IngestError, match="dataset names"):
        ingest(db, settings, "Bad Name!", source, OPERATOR)


def test_existing_name_is_refused_and_kept(db: Database, settings: Settings,
                                           source: Path) -> None:
    first = ingest(db, settings, "bad", source, OPERATOR)
    before = first.path.stat().st_mtime_ns
    with pytest.raises(Conflict, match="already exists"):
        ingest(db, settings, "bad", source, OPERATOR)
    assert first.path.stat().st_mtime_ns == before
    assert sorted(p.name for p in settings.store_dir.iterdir()) == ["bad.duckdb"]
    with db.read() as session:
        outcomes = session.execute(select(AuditEntry.outcome).where(
            AuditEntry.action == "dataset.ingest").order_by(AuditEntry.seq)).scalars().all()
        assert session.execute(select(func.count()).select_from(DatasetRecord)).scalar() == 1
    assert outcomes == ["success", "failure"]


def test_existing_store_file_is_not_overwritten(db: Database, settings: Settings,
                                                source: Path) -> None:
    settings.store_dir.mkdir(parents=True)
    stray = settings.store_dir / "bad.duckdb"
    stray.write_bytes(b"keep me")
    with pytest.raises(Conflict, match="nothing was overwritten"):
        ingest(db, settings, "bad", source, OPERATOR)
    assert stray.read_bytes() == b"keep me"


def test_parquet_null_and_duplicate_name_rows(db: Database, settings: Settings,
                                              tmp_path: Path) -> None:
    src = tmp_path / "pq2"
    generator.generate(src, 50, seed=2, fmt="parquet")
    path = src / "person.parquet"
    original = pq.read_table(path)
    ids = original.column("person_id").to_pylist()
    ids[20] = ids[4]
    pq.write_table(original.set_column(0, "person_id", pa.array(ids, pa.int64())), path)
    expect_failure(db, settings, src, "person.parquet row 21", "duplicate person_id")

    ids[20] = None
    pq.write_table(original.set_column(0, "person_id", pa.array(ids, pa.int64())), path)
    with pytest.raises(IngestError, match=r"person.parquet row 21, column person_id: required"):
        ingest(db, settings, "bad", src, OPERATOR)


def _person_parquet(tmp_path: Path) -> tuple[Path, pa.Table]:
    src = tmp_path / "pq3"
    generator.generate(src, 30, seed=3, fmt="parquet")
    return src, pq.read_table(src / "person.parquet")


def test_parquet_column_twice_is_named(db: Database, settings: Settings,
                                       tmp_path: Path) -> None:
    """The header check reads the file's own schema: a repeated column is named, not renamed
    away as DuckDB's DESCRIBE would."""
    src, original = _person_parquet(tmp_path)
    twice = original.append_column("year_of_birth", original.column("year_of_birth"))
    pq.write_table(twice, src / "person.parquet")
    expect_failure(db, settings, src, "person.parquet line 1 (header)",
                   "column 'year_of_birth' appears twice")


def test_parquet_struct_fields_are_not_columns(db: Database, settings: Settings,
                                               tmp_path: Path) -> None:
    src, original = _person_parquet(tmp_path)
    nested = original.append_column(
        "extra", pa.array([{"person_id": 1, "gender_concept_id": 2}] * original.num_rows))
    pq.write_table(nested, src / "person.parquet")
    detail = expect_failure(db, settings, src, "person.parquet line 1 (header)",
                            "unknown column 'extra'")
    assert "appears twice" not in detail


def test_unreadable_parquet_file_is_named(db: Database, settings: Settings,
                                          tmp_path: Path) -> None:
    src = tmp_path / "pq4"
    generator.generate(src, 30, seed=4, fmt="parquet")
    (src / "death.parquet").write_bytes(b"PAR1" + SECRET.encode() * 10)
    expect_failure(db, settings, src, "death.parquet: not a readable Parquet file")
