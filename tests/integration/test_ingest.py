"""Ingest of good OMOP exports in every variant data holders produce (both control DBs)."""

from __future__ import annotations

import csv
import gzip
import shutil
import stat
from pathlib import Path

import duckdb
import pytest
from sqlalchemy import select

from spe.audit.models import AuditEntry
from spe.auth.principal import operator_principal
from spe.config import Settings
from spe.datasets import generator
from spe.datasets.ingest import ingest
from spe.datasets.metadata import ROW_RANK_COLUMN, DatasetMetadata
from spe.datasets.models import DatasetRecord
from spe.db import Database

PERSONS = 300
OPERATOR = operator_principal("tester")


@pytest.fixture(scope="module")
def source_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omop_csv")
    generator.generate(out, PERSONS, seed=3, fmt="csv")
    return out


@pytest.fixture(scope="module")
def source_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omop_parquet")
    generator.generate(out, PERSONS, seed=3, fmt="parquet")
    return out


def rewrite(src: Path, dst: Path, *, upper_names: bool = False, delimiter: str = ",",
            suffix: str = ".csv", quote_header: bool = True, upper_columns: bool = False,
            crlf: bool = False, drop: tuple[str, ...] = ()) -> Path:
    """Copy a generated CSV export, re-written the way another data holder would."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.csv")):
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        keep = [i for i, c in enumerate(rows[0]) if c not in drop]
        name = (path.stem.upper() if upper_names else path.stem) + suffix
        end = "\r\n" if crlf else "\n"
        with (dst / name).open("w", newline="") as fh:
            header = [rows[0][i].upper() if upper_columns else rows[0][i] for i in keep]
            if quote_header:
                fh.write(delimiter.join(f'"{h}"' for h in header) + end)
            else:
                fh.write(delimiter.join(header) + end)
            writer = csv.writer(fh, delimiter=delimiter, lineterminator=end)
            for row in rows[1:]:
                writer.writerow([row[i] for i in keep])
    for extra in src.glob("spe-metadata.*"):
        shutil.copy(extra, dst / extra.name)
    return dst


def expected_rows(src: Path) -> dict[str, int]:
    con = duckdb.connect()
    return {p.stem: con.execute("SELECT count(*) FROM read_parquet(?)", [str(p)]).fetchone()[0]
            for p in src.glob("*.parquet")}


def check_ingested(db: Database, settings: Settings, name: str, rows: dict[str, int]) -> None:
    path = settings.store_dir / f"{name}.duckdb"
    assert stat.S_IMODE(settings.store_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with db.read() as session:
        rec = session.execute(select(DatasetRecord).where(DatasetRecord.name == name)).scalar_one()
        meta = DatasetMetadata.model_validate(rec.meta)
        audit = session.execute(select(AuditEntry).where(
            AuditEntry.action == "dataset.ingest", AuditEntry.target == name,
            AuditEntry.outcome == "success")).scalar_one()
    assert audit.actor == "tester" and audit.details["rows"] == sum(rows.values())
    assert {t: m.row_count for t, m in meta.tables.items()} == rows
    assert rec.total_rows == sum(rows.values())
    con = duckdb.connect(str(path), read_only=True)
    try:
        for table, tmeta in meta.tables.items():
            cols = con.execute(f"DESCRIBE {table}").fetchall()
            spec_cols = [(c.name, c.type) for c in tmeta.columns]
            assert [(c[0], c[1]) for c in cols][:len(spec_cols)] == spec_cols
            assert con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == rows[table]
            if tmeta.privacy_unit:
                assert tmeta.row_rank_column == ROW_RANK_COLUMN
                bad = con.execute(
                    f"SELECT count(*) FROM (SELECT person_id, count(*) n, min({ROW_RANK_COLUMN}) "
                    f"lo, max({ROW_RANK_COLUMN}) hi, count(DISTINCT {ROW_RANK_COLUMN}) d "
                    f"FROM {table} GROUP BY person_id) WHERE lo <> 1 OR hi <> n OR d <> n"
                ).fetchone()[0]
                assert bad == 0, table
                if tmeta.unique_key != [tmeta.privacy_unit]:  # stored in rank order
                    unordered = con.execute(
                        f"SELECT count(*) FROM (SELECT {ROW_RANK_COLUMN} AS r, "
                        f"lag({ROW_RANK_COLUMN}) OVER (ORDER BY rowid) AS p FROM {table}) "
                        "WHERE r < p").fetchone()[0]
                    assert unordered == 0, table
    finally:
        con.close()


def test_lower_case_csv_with_quoted_header(db: Database, settings: Settings, source_csv: Path,
                                           source_parquet: Path) -> None:
    result = ingest(db, settings, "plain", source_csv, OPERATOR)
    check_ingested(db, settings, "plain", expected_rows(source_parquet))
    assert result.metadata.source_format == "csv"
    value = result.metadata.tables["measurement"].column("value_as_number")
    assert value is not None and value.dp_source == "declared"


def test_upper_case_names_unquoted_header_crlf(db: Database, settings: Settings,
                                               source_csv: Path, source_parquet: Path,
                                               tmp_path: Path) -> None:
    src = rewrite(source_csv, tmp_path / "upper", upper_names=True, quote_header=False,
                  upper_columns=True, crlf=True)
    assert (src / "PERSON.csv").is_file()
    ingest(db, settings, "upper", src, OPERATOR)
    check_ingested(db, settings, "upper", expected_rows(source_parquet))


@pytest.mark.parametrize("suffix", [".tsv", ".txt"])
def test_tab_separated(db: Database, settings: Settings, source_csv: Path,
                       source_parquet: Path, tmp_path: Path, suffix: str) -> None:
    src = rewrite(source_csv, tmp_path / "tab", delimiter="\t", suffix=suffix)
    result = ingest(db, settings, "tabbed", src, OPERATOR)
    assert result.metadata.source_format == "tsv"
    check_ingested(db, settings, "tabbed", expected_rows(source_parquet))


def test_parquet(db: Database, settings: Settings, source_parquet: Path) -> None:
    result = ingest(db, settings, "pq", source_parquet, OPERATOR)
    assert result.metadata.source_format == "parquet"
    check_ingested(db, settings, "pq", expected_rows(source_parquet))


def test_missing_optional_columns_become_null(db: Database, settings: Settings,
                                              source_csv: Path, tmp_path: Path) -> None:
    src = rewrite(source_csv, tmp_path / "slim", drop=("care_site_id", "gender_source_value"))
    for extra in src.glob("spe-metadata.*"):
        extra.unlink()  # its public values for the dropped column would still be valid
    result = ingest(db, settings, "slim", src, OPERATOR)
    con = duckdb.connect(str(result.path), read_only=True)
    assert con.execute("SELECT count(care_site_id) FROM person").fetchone()[0] == 0
    con.close()
    gender = result.metadata.tables["person"].column("gender_concept_id")
    assert gender is not None and gender.dp_source == "default"


def test_content_hash_depends_on_the_files(db: Database, settings: Settings,
                                           source_csv: Path, tmp_path: Path) -> None:
    a = ingest(db, settings, "a", source_csv, OPERATOR).metadata.content_sha256
    copy = Path(shutil.copytree(source_csv, tmp_path / "copy"))
    b = ingest(db, settings, "b", copy, OPERATOR).metadata.content_sha256
    (copy / "person.csv").write_text((copy / "person.csv").read_text().replace(",8527,", ",0,"))
    c = ingest(db, settings, "c", copy, OPERATOR).metadata.content_sha256
    assert len(a) == 64 and a == b != c


def test_gzipped_csv(db: Database, settings: Settings, source_csv: Path, source_parquet: Path,
                     tmp_path: Path) -> None:
    src = tmp_path / "gz"
    src.mkdir()
    for path in source_csv.iterdir():
        if path.suffix == ".csv":
            (src / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
        else:
            shutil.copy(path, src / path.name)
    ingest(db, settings, "zipped", src, OPERATOR)
    check_ingested(db, settings, "zipped", expected_rows(source_parquet))


def test_store_dir_mode_is_tightened(db: Database, settings: Settings,
                                     source_parquet: Path) -> None:
    settings.store_dir.mkdir(parents=True, mode=0o755)
    settings.store_dir.chmod(0o755)
    ingest(db, settings, "tight", source_parquet, OPERATOR)
    assert stat.S_IMODE(settings.store_dir.stat().st_mode) == 0o700


def test_concurrent_ingests_of_one_name(db: Database, settings: Settings,
                                        source_parquet: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from spe.errors import Conflict

    def attempt() -> str:
        try:
            ingest(db, settings, "race", source_parquet, OPERATOR)
        except Conflict:
            return "conflict"
        return "ok"

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(lambda _: attempt(), range(2)))
    assert outcomes == ["conflict", "ok"]
    assert sorted(p.name for p in settings.store_dir.iterdir()) == ["race.duckdb"]
    check_ingested(db, settings, "race", expected_rows(source_parquet))


def test_dates_exported_with_midnight_time(db: Database, settings: Settings, source_csv: Path,
                                           tmp_path: Path) -> None:
    src = Path(shutil.copytree(source_csv, tmp_path / "midnight"))
    path = src / "observation_period.csv"
    lines = path.read_text().splitlines()
    fixed = [lines[0]] + [
        ",".join(f"{v} 00:00:00" if len(v) == 10 and v[4] == "-" else v for v in line.split(","))
        for line in lines[1:]]
    path.write_text("\n".join(fixed) + "\n")
    assert "00:00:00" in path.read_text()
    result = ingest(db, settings, "midnight", src, OPERATOR)
    con = duckdb.connect(str(result.path), read_only=True)
    kind = con.execute("SELECT typeof(observation_period_start_date) FROM observation_period "
                       "LIMIT 1").fetchone()[0]
    con.close()
    assert kind == "DATE"
