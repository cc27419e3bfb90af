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


def _load(tmp_path: Path, text: str) -> defaults.Declaration:
    (tmp_path / "spe-metadata.yaml").write_text(text)
    decl, _ = defaults.load_declaration(tmp_path, load_spec())
    return decl


def test_public_values_are_normalised_and_exact_repeats_dropped(tmp_path: Path) -> None:
    decl = _load(tmp_path, "version: 1\ntables:\n  measurement:\n    columns:\n"
                 "      measurement_concept_id: {public_values: [3004410, '3016723', 3004410]}\n"
                 "      unit_source_value: {public_values: [mg, 12, mg]}\n")
    concept = _meta("measurement", "measurement_concept_id", decl)
    assert concept.public_values == [3004410, 3016723]  # the engine's key form: integers
    unit = _meta("measurement", "unit_source_value", decl)
    assert unit.public_values == ["mg", "12"]


@pytest.mark.parametrize("values", ["[8507, '8507']", "[8507, ' 8507']", "['12', 12]"])
def test_public_values_spelled_twice_are_refused(tmp_path: Path, values: str) -> None:
    column = "unit_source_value" if "'12'" in values else "measurement_concept_id"
    (tmp_path / "spe-metadata.yaml").write_text(
        f"version: 1\ntables:\n  measurement:\n    columns:\n      {column}: "
        f"{{public_values: {values}}}\n")
    with pytest.raises(IngestError) as info:
        defaults.load_declaration(tmp_path, load_spec())
    assert f"tables.measurement.columns.{column}" in str(info.value)
    assert "different spellings" in str(info.value)


def test_bounds_are_ordered_after_the_defaults_apply(tmp_path: Path) -> None:
    # The built-in upper bound of value_as_number is 1000: a declared lower of 2000 alone
    # would leave an empty interval.
    decl = _load(tmp_path, "version: 1\ntables:\n  measurement:\n    columns:\n"
                 "      value_as_number: {lower: 2000}\n")
    with pytest.raises(IngestError) as info:
        _meta("measurement", "value_as_number", decl)
    assert "tables.measurement.columns.value_as_number" in str(info.value)


@pytest.mark.parametrize("bound", [".inf", "-.inf", ".nan"])
def test_non_finite_bounds_are_refused(tmp_path: Path, bound: str) -> None:
    (tmp_path / "spe-metadata.yaml").write_text(
        "version: 1\ntables:\n  measurement:\n    columns:\n"
        f"      value_as_number: {{lower: 0, upper: {bound}}}\n")
    with pytest.raises(IngestError) as info:
        defaults.load_declaration(tmp_path, load_spec())
    assert "measurement" in str(info.value) and "value_as_number" in str(info.value)


def test_table_kinds_by_default_and_declared(tmp_path: Path) -> None:
    specs = load_spec()
    empty = defaults.Declaration()
    kinds = {name: defaults.table_kind(spec, empty)[0] for name, spec in specs.items()}
    assert kinds["person"] == kinds["death"] == kinds["specimen"] == "person"
    assert kinds["note_nlp"] == kinds["cost"] == kinds["episode_event"] == "linked"
    assert kinds["concept"] == kinds["cdm_source"] == kinds["metadata"] == "public"
    for name in ("location", "provider", "care_site", "fact_relationship", "cohort"):
        assert kinds[name] == "refused"
    decl = _load(tmp_path, "version: 1\ntables:\n  provider: {kind: public}\n")
    assert defaults.table_kind(specs["provider"], decl)[0] == "public"
