"""The bundled OMOP CDM 5.4 spec against the official field-level specification."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from spe.datasets.omop_spec import DUCKDB_TYPES, duckdb_type, load_spec, table_spec

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omop" / \
    "OMOP_CDMv5.4_Field_Level.csv"


def official_rows() -> list[dict[str, str]]:
    if not OFFICIAL.is_file():
        pytest.skip("official OMOP CDM 5.4 field-level spec not available")
    with OFFICIAL.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def official_tables() -> dict[str, list[dict[str, str]]]:
    tables: dict[str, list[dict[str, str]]] = {}
    for row in official_rows():
        tables.setdefault(row["cdmTableName"].lower(), []).append(row)
    return tables


def test_every_official_table_and_column_in_order() -> None:
    spec = load_spec()
    official = official_tables()
    assert set(spec) == set(official)
    for name, rows in official.items():
        # Fields the official table quotes because they are SQL keywords ('"offset"') are
        # named plainly, as exports name them.
        assert spec[name].column_names == [r["cdmFieldName"].strip('"').lower()
                                           for r in rows], name
    assert "offset" in spec["note_nlp"].column_names


def test_required_primary_key_and_types_match_official() -> None:
    for name, rows in official_tables().items():
        for field, row in zip(table_spec(name).fields, rows, strict=True):
            assert field.required == (row["isRequired"].lower() == "yes"), (name, field.name)
            assert field.primary_key == (row["isPrimaryKey"].lower() == "yes")
            assert field.cdm_datatype.lower() == row["cdmDatatype"].lower()
            assert field.duckdb_type == duckdb_type(row["cdmDatatype"])


@pytest.mark.parametrize(("cdm", "duck"), [
    ("integer", "BIGINT"), ("Integer", "BIGINT"), ("float", "DOUBLE"), ("date", "DATE"),
    ("datetime", "TIMESTAMP"), ("varchar(50)", "VARCHAR"), ("varchar(MAX)", "VARCHAR"),
])
def test_type_mapping(cdm: str, duck: str) -> None:
    assert duckdb_type(cdm) == duck


def test_unknown_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown OMOP CDM datatype"):
        duckdb_type("blob")


def test_spec_shape() -> None:
    person = table_spec("PERSON")
    assert person.primary_key == ["person_id"]
    assert person.has_person_id
    assert not table_spec("concept").has_person_id
    assert {f.duckdb_type for t in load_spec().values() for f in t.fields} <= DUCKDB_TYPES
    assert table_spec("measurement").field("value_as_number").duckdb_type == "DOUBLE"
    assert table_spec("person").field("person_source_value").max_length == 50
