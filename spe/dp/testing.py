"""Small synthetic OMOP-like datasets and permit terms for DP tests and the benchmark.

Contract: :func:`make_dataset` writes a DuckDB file with ``person``, ``measurement``,
``condition_occurrence``, ``drug_exposure`` (each person-level, with the ingest rank column
``_spe_row_rank``) and a public ``concept`` reference table, and returns its metadata.
:func:`make_terms` returns active permit terms granting every column of it. Data are random;
nothing here is used on real data.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from permits.terms import (
    AccessMode,
    DatasetGrant,
    PermitStatus,
    PermitTerms,
    PrivacyBudget,
)
from spe.datasets.metadata import ROW_RANK_COLUMN, ColumnMeta, DatasetMetadata, TableMeta

GENDERS = [8507, 8532, 0]
MEAS_CONCEPTS = [3004249, 3012888, 3027018, 3020891, 3025315]


def _rank_sql(table: str, seed: int) -> str:
    # Stored in rank order, as ingest stores them (see spe.datasets.ingest).
    return (f"CREATE TABLE {table} AS SELECT * FROM (SELECT *, CAST(row_number() OVER "
            f"(PARTITION BY person_id ORDER BY hash(_rid, {seed})) AS INTEGER) AS "
            f"{ROW_RANK_COLUMN} FROM _{table}) ORDER BY {ROW_RANK_COLUMN}; "
            f"DROP TABLE _{table};")


def make_dataset(path: Path, persons: int = 2_000, rows_per_person: int = 10,
                 seed: int = 7, name: str = "demo", extra_sql: str | None = None
                 ) -> DatasetMetadata:
    """Write a synthetic dataset to ``path``; ``extra_sql`` runs before ranking (tests)."""
    con = duckdb.connect(str(path))
    con.execute(f"SELECT setseed({(seed % 1000) / 1000.0})")
    n_meas = persons * rows_per_person
    con.execute(f"""
        CREATE TABLE _person AS SELECT i AS person_id, i AS _rid,
          CAST(list_extract([8507, 8532, 0], 1 + CAST(floor(random() * 2.02) AS INTEGER))
               AS BIGINT) AS gender_concept_id,
          CAST(1930 + floor(random() * 80) AS BIGINT) AS year_of_birth
        FROM range(1, {persons} + 1) t(i);
        CREATE TABLE _measurement AS SELECT i AS measurement_id, i AS _rid,
          CAST(1 + floor(random() * {persons}) AS BIGINT) AS person_id,
          CAST(list_extract({MEAS_CONCEPTS}, 1 + CAST(floor(random() * 5) AS INTEGER))
               AS BIGINT) AS measurement_concept_id,
          DATE '2010-01-01' + CAST(floor(random() * 5000) AS INTEGER) AS measurement_date,
          CASE WHEN random() < 0.05 THEN NULL ELSE round(50 + random() * 100, 2) END
               AS value_as_number
        FROM range(1, {n_meas} + 1) t(i);
        CREATE TABLE _condition_occurrence AS SELECT i AS condition_occurrence_id, i AS _rid,
          CAST(1 + floor(random() * {persons}) AS BIGINT) AS person_id,
          CAST(201820 + floor(random() * 20) AS BIGINT) AS condition_concept_id,
          DATE '2010-01-01' + CAST(floor(random() * 5000) AS INTEGER) AS condition_start_date
        FROM range(1, {persons * 2} + 1) t(i);
        CREATE TABLE _drug_exposure AS SELECT i AS drug_exposure_id, i AS _rid,
          CAST(1 + floor(random() * {persons}) AS BIGINT) AS person_id,
          CAST(1100000 + floor(random() * 30) AS BIGINT) AS drug_concept_id,
          DATE '2010-01-01' + CAST(floor(random() * 5000) AS INTEGER) AS drug_exposure_start_date
        FROM range(1, {persons * 3} + 1) t(i);
        CREATE TABLE concept AS SELECT c AS concept_id, 'concept ' || c AS concept_name
        FROM (SELECT unnest({MEAS_CONCEPTS + GENDERS}) AS c);
    """)
    if extra_sql:
        con.execute(extra_sql)
    for t in ("person", "measurement", "condition_occurrence", "drug_exposure"):
        con.execute(_rank_sql(t, seed))
        con.execute(f"ALTER TABLE {t} DROP COLUMN _rid")
    counts = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # type: ignore[index]
              for t in ("person", "measurement", "condition_occurrence", "drug_exposure",
                        "concept")}
    # As ingest does for a primary key: declare person unique on person_id only if it is.
    dup = con.execute("SELECT COUNT(*) - COUNT(DISTINCT person_id) FROM person").fetchone()
    person_key = ["person_id"] if dup is not None and dup[0] == 0 else []
    con.close()
    big = "BIGINT"
    tables = {
        "person": TableMeta(name="person", row_count=counts["person"], max_rows_per_person=1,
                            unique_key=person_key, columns=[
            ColumnMeta(name="person_id", type=big, nullable=False),
            ColumnMeta(name="gender_concept_id", type=big, public_values=GENDERS),
            ColumnMeta(name="year_of_birth", type=big, lower=1900, upper=2025),
        ]),
        "measurement": TableMeta(name="measurement", row_count=counts["measurement"],
                                 max_rows_per_person=5, columns=[
            ColumnMeta(name="measurement_id", type=big),
            ColumnMeta(name="person_id", type=big, nullable=False),
            ColumnMeta(name="measurement_concept_id", type=big, public_values=MEAS_CONCEPTS),
            ColumnMeta(name="measurement_date", type="DATE", lower=2010, upper=2024),
            ColumnMeta(name="value_as_number", type="DOUBLE", lower=0, upper=500),
        ]),
        "condition_occurrence": TableMeta(
            name="condition_occurrence", row_count=counts["condition_occurrence"],
            max_rows_per_person=3, columns=[
                ColumnMeta(name="condition_occurrence_id", type=big),
                ColumnMeta(name="person_id", type=big, nullable=False),
                ColumnMeta(name="condition_concept_id", type=big),
                ColumnMeta(name="condition_start_date", type="DATE", lower=2010, upper=2024),
            ]),
        "drug_exposure": TableMeta(
            name="drug_exposure", row_count=counts["drug_exposure"], max_rows_per_person=3,
            columns=[
                ColumnMeta(name="drug_exposure_id", type=big),
                ColumnMeta(name="person_id", type=big, nullable=False),
                ColumnMeta(name="drug_concept_id", type=big),
                ColumnMeta(name="drug_exposure_start_date", type="DATE", lower=2010,
                           upper=2024),
            ]),
        "concept": TableMeta(name="concept", row_count=counts["concept"], privacy_unit=None,
                             unique_key=["concept_id"], columns=[
            ColumnMeta(name="concept_id", type=big, nullable=False),
            ColumnMeta(name="concept_name", type="VARCHAR"),
        ]),
    }
    digest = hashlib.sha256(f"{persons}:{rows_per_person}:{seed}".encode()).hexdigest()
    return DatasetMetadata(name=name, tables=tables, source_format="parquet",
                           content_sha256=digest)


def make_terms(meta: DatasetMetadata, *, permit_id: str = "P-TEST-1", epsilon: float = 10.0,
               delta: float = 1e-5, max_epsilon_per_query: float = 5.0,
               persons: frozenset[str] = frozenset({"alice"}),
               per_person_epsilon: float | None = None,
               status: PermitStatus = PermitStatus.ACTIVE) -> PermitTerms:
    now = datetime.now(UTC)
    tables = {t.name: frozenset(c.name for c in t.columns) for t in meta.tables.values()}
    return PermitTerms(
        permit_id=permit_id, version=1, access_body="hdab-test", status=status,
        valid_from=now - timedelta(days=1), valid_until=now + timedelta(days=365),
        persons=persons, access_mode=AccessMode.DP_ONLY,
        datasets=(DatasetGrant(dataset=meta.name, tables=tables),),
        budget=PrivacyBudget(epsilon=epsilon, delta=delta,
                             max_epsilon_per_query=max_epsilon_per_query,
                             per_person_epsilon=per_person_epsilon),
    )
