"""Vocabulary files as OHDSI distributes them: tab-separated, upper-case names, dates written
YYYYMMDD. They ingest as public reference data and join to per-person tables on their key."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from spe.auth.principal import operator_principal
from spe.config import Settings
from spe.datasets.ingest import ingest
from spe.db import Database
from spe.dp.runner import prepare, release
from spe.dp.testing import make_terms
from spe.errors import IngestError
from tests.security.omop_neighbours import write_export

OPERATOR = operator_principal("tester")
HEADER = ("concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\t"
          "standard_concept\tconcept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason")


def _vocab(src: Path, rows: list[str]) -> None:
    (src / "concept.csv").unlink()
    (src / "CONCEPT.csv").write_text("\n".join([HEADER, *rows]) + "\n")


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    return sqlite_db


def test_athena_style_concept_file_ingests_and_joins(tmp_path: Path, db: Database) -> None:
    src = write_export(tmp_path / "src", False)
    # Names with quotes inside, as in the real vocabulary ('"Cold" remedy', '5" pen').
    _vocab(src, [f"{i}\t\"Concept\" {i}\" pen\tCondition\tSNOMED\tClinical Finding\tS\tC{i}\t"
                 "19700101\t20991231\t" for i in range(1, 8)])
    info = ingest(db, Settings(data_dir=tmp_path / "var"), "vocab", src, OPERATOR)
    concept = info.metadata.tables["concept"]
    assert concept.kind == "public" and concept.row_count == 7
    con = duckdb.connect(str(info.path), read_only=True)
    first = con.execute("SELECT min(valid_start_date), max(valid_end_date) FROM concept"
                        ).fetchone()
    assert first is not None and str(first[0]) == "1970-01-01" and str(first[1]) == "2099-12-31"
    names = con.execute("SELECT concept_name FROM concept ORDER BY concept_id").fetchall()
    assert names[0][0] == '"Concept" 1" pen'
    con.close()
    prepared = prepare("SELECT c.concept_name, COUNT(*) FROM condition_occurrence o JOIN "
                       "concept c ON c.concept_id = o.condition_concept_id GROUP BY "
                       "c.concept_name", info.metadata, make_terms(info.metadata),
                       epsilon=1.0, delta=1e-6)
    assert release(prepared, info.path,
                   Settings(data_dir=tmp_path / "var", query_timeout_seconds=20)) is not None


def test_a_line_in_the_other_date_format_is_named(tmp_path: Path, db: Database) -> None:
    src = write_export(tmp_path / "src", False)
    _vocab(src, ["1\tA\tCondition\tSNOMED\tClinical Finding\tS\tC1\t19700101\t20991231\t",
                 "2\tB\tCondition\tSNOMED\tClinical Finding\tS\tC2\t1970-01-01\t20991231\t"])
    with pytest.raises(IngestError) as info:
        ingest(db, Settings(data_dir=tmp_path / "var"), "vocab", src, OPERATOR)
    assert "CONCEPT.csv line 3, column valid_start_date" in str(info.value)
