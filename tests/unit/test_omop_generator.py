"""The synthetic OMOP generator: official schema, determinism, plausible distributions."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spe.datasets import defaults, generator
from spe.datasets.omop_spec import load_spec
from tests.unit.test_omop_spec import official_tables

PERSONS = 2000


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen_csv")
    generator.generate(out, PERSONS, seed=7, fmt="csv")
    return out


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen_parquet")
    generator.generate(out, PERSONS, seed=7, fmt="parquet")
    return out


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


def test_csv_headers_are_the_official_columns_in_order(csv_dir: Path) -> None:
    official = official_tables()
    for table in generator.TABLES:
        with (csv_dir / f"{table}.csv").open(newline="") as fh:
            header = next(csv.reader(fh))
        assert header == [r["cdmFieldName"].lower() for r in official[table]], table


def test_parquet_schema_names_and_types(parquet_dir: Path) -> None:
    arrow = {"BIGINT": pa.int64(), "DOUBLE": pa.float64(), "DATE": pa.date32(),
             "TIMESTAMP": pa.timestamp("s"), "VARCHAR": pa.string()}
    official = official_tables()
    for table in generator.TABLES:
        schema = pq.read_schema(parquet_dir / f"{table}.parquet")
        assert schema.names == [r["cdmFieldName"].lower() for r in official[table]]
        for field in load_spec()[table].fields:
            got = schema.field(field.name).type
            if field.duckdb_type == "TIMESTAMP":  # Parquet has no second unit: ms on disk
                assert pa.types.is_timestamp(got) and got.tz is None, field.name
            else:
                assert got == arrow[field.duckdb_type], field.name


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, csv_dir: Path) -> None:
    again = tmp_path / "again"
    generator.generate(again, PERSONS, seed=7, fmt="csv")
    assert _digest(again) == _digest(csv_dir)
    other = tmp_path / "other"
    generator.generate(other, PERSONS, seed=8, fmt="csv")
    assert _digest(other)["measurement.csv"] != _digest(csv_dir)["measurement.csv"]


def test_chunking_keeps_ids_unique(tmp_path: Path) -> None:
    persons = generator.CHUNK_PERSONS + 300
    stats = generator.generate(tmp_path, persons, seed=1, fmt="parquet")
    con = duckdb.connect()
    for table, key in (("person", "person_id"), ("measurement", "measurement_id"),
                       ("visit_occurrence", "visit_occurrence_id")):
        path = str(tmp_path / f"{table}.parquet")
        n, distinct = con.execute(
            f"SELECT count(*), count(DISTINCT {key}) FROM read_parquet(?)", [path]).fetchone()
        assert n == distinct == stats.rows[table]


def test_plausible_distributions(parquet_dir: Path) -> None:
    con = duckdb.connect()

    def q(sql: str) -> list[tuple]:
        return con.execute(sql.replace("{d}", str(parquet_dir))).fetchall()

    sexes = dict(q("SELECT gender_concept_id, count(*) FROM '{d}/person.parquet' GROUP BY 1"))
    assert set(sexes) <= {8507, 8532, 0}
    assert 0.4 < sexes[8507] / PERSONS < 0.6
    ages = q("SELECT min(2024 - year_of_birth), max(2024 - year_of_birth) "
             "FROM '{d}/person.parquet'")[0]
    assert ages[0] >= 0 and 80 <= ages[1] <= 99
    per_person = q("SELECT count(*) / 2000.0 FROM '{d}/measurement.parquet'")[0][0]
    assert 8 < per_person < 12
    deaths = q("SELECT count(*) / 2000.0 FROM '{d}/death.parquet'")[0][0]
    assert 0.01 < deaths < 0.08
    # Skewed codes: the most frequent condition is far more common than the least frequent.
    counts = [c for (c,) in q("SELECT count(*) FROM '{d}/condition_occurrence.parquet' "
                              "GROUP BY condition_concept_id ORDER BY 1 DESC")]
    assert counts[0] > 5 * counts[-1]
    # Several rows per person, and some measurement outliers and missing values.
    assert q("SELECT max(c) FROM (SELECT count(*) c FROM '{d}/visit_occurrence.parquet' "
             "GROUP BY person_id)")[0][0] > 5
    nulls = q("SELECT count(*) FILTER (WHERE value_as_number IS NULL) "
              "FROM '{d}/measurement.parquet'")[0][0]
    assert nulls > 0
    # Events lie inside the person's observation period.
    outside = q("SELECT count(*) FROM '{d}/measurement.parquet' m JOIN "
                "'{d}/observation_period.parquet' o USING (person_id) WHERE "
                "m.measurement_date NOT BETWEEN o.observation_period_start_date AND "
                "o.observation_period_end_date")[0][0]
    assert outside == 0


def test_declaration_is_valid_and_true(parquet_dir: Path) -> None:
    decl, path = defaults.load_declaration(parquet_dir, load_spec())
    assert path is not None and path.name == "spe-metadata.yaml"
    con = duckdb.connect()
    for table, tdecl in decl.tables.items():
        src = f"'{parquet_dir}/{table}.parquet'"
        for column, c in tdecl.columns.items():
            if c.lower is not None:
                assert con.execute(f"SELECT count(*) FROM {src} WHERE {column} < ?",
                                   [c.lower]).fetchone()[0] == 0, (table, column)
            if c.upper is not None:
                assert con.execute(f"SELECT count(*) FROM {src} WHERE {column} > ?",
                                   [c.upper]).fetchone()[0] == 0, (table, column)
            if c.public_values is not None:
                seen = {v for (v,) in con.execute(
                    f"SELECT DISTINCT {column} FROM {src} WHERE {column} IS NOT NULL")
                    .fetchall()}
                assert seen <= set(c.public_values), (table, column)
            if c.year_lower is not None:
                lo, hi = con.execute(f"SELECT min(year({column})), max(year({column})) "
                                     f"FROM {src}").fetchone()
                assert c.year_lower <= lo and hi <= c.year_upper, (table, column)
