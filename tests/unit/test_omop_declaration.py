"""Built-in DP defaults and the data holder's declaration file (YAML/TOML)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spe.datasets import defaults
from spe.datasets.omop_spec import load_spec
from spe.errors import IngestError


def _meta(table: str, column: str, decl: defaults.Declaration) -> defaults.ColumnMeta:
    field = load_spec()[table].field(column)
    assert field is not None
    return defaults.column_meta(table, column, field.duckdb_type, field.required, decl)


def test_builtin_defaults() -> None:
    empty = defaults.Declaration()
    gender = _meta("person", "gender_concept_id", empty)
    assert gender.public_values == [8507, 8532, 0] and gender.dp_source == "default"
    yob = _meta("person", "year_of_birth", empty)
    assert yob.lower == 1900 and yob.upper is not None and yob.upper >= 2024
    assert _meta("drug_exposure", "days_supply", empty).upper == 365
    assert _meta("measurement", "measurement_date", empty).year_lower == 1990
    assert _meta("person", "person_source_value", empty).dp_source is None
    assert defaults.max_rows_per_person("person", empty) == 1
    assert defaults.max_rows_per_person("measurement", empty) == defaults.DEFAULT_K


def test_yaml_overrides_and_removes_defaults(tmp_path: Path) -> None:
    (tmp_path / "spe-metadata.yaml").write_text(
        "version: 1\nmax_groups_per_person: 3\ntables:\n"
        "  measurement:\n    max_rows_per_person: 25\n    columns:\n"
        "      value_as_number: {lower: 1, upper: 50}\n"
        "  person:\n    columns:\n      gender_concept_id: {public_values: null}\n")
    decl, path = defaults.load_declaration(tmp_path, load_spec())
    assert path is not None and decl.max_groups_per_person == 3
    value = _meta("measurement", "value_as_number", decl)
    assert (value.lower, value.upper, value.dp_source) == (1, 50, "declared")
    assert _meta("person", "gender_concept_id", decl).public_values is None
    assert defaults.max_rows_per_person("measurement", decl) == 25


def test_toml_declaration(tmp_path: Path) -> None:
    (tmp_path / "spe-metadata.toml").write_text(
        "version = 1\n[tables.drug_exposure.columns.quantity]\nlower = 0\nupper = 90\n")
    decl, _ = defaults.load_declaration(tmp_path, load_spec())
    assert _meta("drug_exposure", "quantity", decl).upper == 90


@pytest.mark.parametrize(("text", "expected"), [
    ("tables:\n  person:\n    columns:\n      year_of_birth: {lower: 2000, upper: 1900}\n",
     "lower must not exceed upper"),
    ("tables:\n  persons: {}\n", "tables.persons: not an OMOP CDM 5.4 table"),
    ("tables:\n  person:\n    columns:\n      shoe_size: {lower: 1}\n",
     "tables.person.columns.shoe_size: not a column of person"),
    ("tables:\n  person:\n    columns:\n      person_source_value: {lower: 1}\n",
     "lower/upper need a numeric column"),
    ("tables:\n  person:\n    columns:\n      year_of_birth: {bounds: [1, 2]}\n",
     "tables.person.columns.year_of_birth.bounds"),
    ("tables: [1, 2\n", "not valid YAML at line"),
    ("- 1\n", "top level must be a mapping"),
])
def test_invalid_declarations_are_explained(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "spe-metadata.yaml").write_text(text)
    with pytest.raises(IngestError) as err:
        defaults.load_declaration(tmp_path, load_spec())
    assert expected in err.value.detail
    assert "spe-metadata.yaml" in err.value.detail


def test_two_declaration_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "spe-metadata.yaml").write_text("version: 1\n")
    (tmp_path / "spe-metadata.toml").write_text("version = 1\n")
    with pytest.raises(IngestError, match="more than one declaration file"):
        defaults.load_declaration(tmp_path, load_spec())
