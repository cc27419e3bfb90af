"""Data-dependent DuckDB errors are a membership oracle: refuse them before data are touched.

A query that fails only when some row reaches an expression (a VARCHAR cast to a number or a
date at run time, a string used as a boolean, an integer overflow in date-part arithmetic, an
infinite timestamp subtracted) turns "did the query fail?" into one exact, noise-free bit about
the data, e.g. whether person 123 is in the dataset. The planner must refuse such expressions
(nothing charged) or compile them so that they cannot fail; on neighbouring datasets the
outcome (refused, failed or released, and the released shape) must be the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spe.config import Settings
from spe.dp.runner import prepare, release
from spe.dp.testing import make_dataset, make_terms
from spe.errors import QueryRefused

HEAVY = 123
REMOVE = f"""
DELETE FROM _measurement WHERE person_id = {HEAVY};
DELETE FROM _condition_occurrence WHERE person_id = {HEAVY};
DELETE FROM _drug_exposure WHERE person_id = {HEAVY};
DELETE FROM _person WHERE person_id = {HEAVY};
"""
JOIN = ("FROM measurement m JOIN concept c ON c.concept_id = m.measurement_concept_id ")
ISOLATE = f"CASE WHEN m.person_id = {HEAVY} THEN {{}} ELSE FALSE END"

REFUSED = [
    # VARCHAR compared with a number: DuckDB casts the string at run time, per row.
    f"SELECT COUNT(*) {JOIN}WHERE " + ISOLATE.format("c.concept_name = 1"),
    f"SELECT COUNT(*) {JOIN}WHERE " + ISOLATE.format("c.concept_name IN (1, 2)"),
    f"SELECT COUNT(*) {JOIN}WHERE " + ISOLATE.format("c.concept_name > 1.5"),
    # VARCHAR used as a boolean.
    f"SELECT COUNT(*) {JOIN}WHERE " + ISOLATE.format("c.concept_name"),
    f"SELECT COUNT(*) {JOIN}WHERE " + ISOLATE.format("c.concept_name IS TRUE"),
    f"SELECT COUNT(*) {JOIN}WHERE " + ISOLATE.format("NOT c.concept_name"),
    f"SELECT SUM(CASE WHEN c.concept_name THEN 1 ELSE 0 END) {JOIN}",
    # A date compared with a string DuckDB cannot read as a date (cast only when rows exist).
    "SELECT COUNT(*) FROM measurement m WHERE "
    + ISOLATE.format("m.measurement_date IN ('not a date')"),
    "SELECT COUNT(*) FROM measurement m WHERE "
    + ISOLATE.format("m.measurement_date = 'x'"),
    # Date arithmetic (infinite timestamps raise on subtraction) and strings in arithmetic.
    "SELECT COUNT(*) FROM measurement m WHERE "
    + ISOLATE.format("m.measurement_date - m.measurement_date > 1"),
    f"SELECT COUNT(*) {JOIN}WHERE " + ISOLATE.format("lower(m.value_as_number) = 'x'"),
    # A join on columns of different kinds casts one side per row.
    "SELECT COUNT(*) FROM measurement m JOIN concept c ON c.concept_id = m.measurement_date",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = Path(tmp_path_factory.mktemp("types"))
    meta = make_dataset(base / "with.duckdb", persons=300)
    make_dataset(base / "without.duckdb", persons=300, extra_sql=REMOVE)
    return meta, base / "with.duckdb", base / "without.duckdb", Settings(data_dir=base / "v")


@pytest.mark.parametrize("sql", REFUSED)
def test_data_dependent_cast_errors_refused_before_data(pair, sql: str) -> None:  # type: ignore[no-untyped-def]
    meta = pair[0]
    with pytest.raises(QueryRefused):
        prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6)


@pytest.mark.parametrize("sql", [
    # BIGINT date parts multiplied: an INT64 overflow iff some row reaches the product.
    "SELECT COUNT(*) FROM measurement m WHERE " + ISOLATE.format(
        " * ".join(["YEAR(m.measurement_date)"] * 6) + " > 0"),
    "SELECT SUM(CASE WHEN m.person_id = 123 THEN 1 ELSE 0 END) FROM measurement m WHERE "
    + " * ".join(["EXTRACT(year FROM m.measurement_date)"] * 6) + " > 0",
    # Valid forms keep working: dates against ISO strings and typed literals.
    "SELECT COUNT(*) FROM measurement WHERE measurement_date >= '2015-01-01' "
    "AND measurement_date < DATE '2016-01-01'",
    "SELECT COUNT(*) FROM measurement WHERE measurement_date IN ('2015-06-01', '2015-06-02')",
    f"SELECT COUNT(*) {JOIN}WHERE c.concept_name LIKE 'concept%' AND lower(c.concept_name) "
    "= 'x'",
    "SELECT YEAR(measurement_date) AS y, COUNT(*) FROM measurement GROUP BY 1",
])
def test_same_outcome_on_neighbouring_datasets(pair, sql: str) -> None:  # type: ignore[no-untyped-def]
    meta, with_path, without_path, settings = pair
    prepared = prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6)
    shapes = []
    for path in (with_path, without_path):
        rel = release(prepared, path, settings)  # must not raise on either dataset
        shapes.append((rel.table.shape, list(rel.table.columns)))
    assert shapes[0] == shapes[1]
