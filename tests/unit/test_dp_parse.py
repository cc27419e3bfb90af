"""Parse-time refusals, plan checks and mechanism contracts (no data touched)."""

from __future__ import annotations

from pathlib import Path

import opendp.prelude as dp
import pytest

from spe.dp import mechanisms as mech
from spe.dp.parse import parse
from spe.dp.plan import compile_plan
from spe.dp.runner import prepare
from spe.dp.testing import make_dataset, make_terms
from spe.errors import QueryRefused

PAYLOADS = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT COUNT(*) FROM read_csv_auto('x.csv')",
    "SELECT read_text('/etc/passwd') FROM person",
    "SELECT COUNT(*) FROM read_text('/etc/passwd')",
    "SELECT COUNT(*) FROM glob('/*')",
    "SELECT COUNT(*) FROM '/etc/passwd'",
    "COPY person TO '/tmp/x.csv'",
    "COPY (SELECT * FROM person) TO '/tmp/x.csv'",
    "ATTACH '/tmp/other.duckdb' AS o",
    "DETACH o",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "PRAGMA database_list",
    "CALL pragma_version()",
    "SELECT COUNT(*) FROM query('SELECT * FROM person')",
    "SELECT getenv('HOME') FROM person",
    "SELECT COUNT(*) FROM duckdb_settings()",
    "SELECT current_setting('threads') FROM person",
    "SELECT COUNT(*) FROM person; SELECT 1",
    "SELECT COUNT(*) FROM person; ATTACH 'x'",
    "SELECT COUNT(*) FROM person -- ; ATTACH 'x'",
    "SELECT COUNT(*) /* x */ FROM person",
    "SELECT COUNT(*) FROM person /*; COPY person TO 'x' */",
    "WITH t AS (SELECT * FROM person) SELECT COUNT(*) FROM t",
    "SELECT COUNT(*) FROM (SELECT * FROM person)",
    "SELECT COUNT(*) OVER () FROM person",
    "SELECT MIN(year_of_birth) FROM person",
    "SELECT MAX(year_of_birth) FROM person",
    "SELECT COUNT(*) FROM person UNION SELECT COUNT(*) FROM person",
    "SELECT * FROM person",
    "SELECT COUNT(*) FROM person WHERE person_id IN (SELECT person_id FROM measurement)",
    "SELECT COUNT(*) FROM person p, measurement m",
    "SELECT COUNT(*) FROM person p LEFT JOIN measurement m ON p.person_id = m.person_id",
    "SELECT COUNT(*) FROM person p JOIN measurement m ON p.person_id < m.person_id",
    "SELECT CAST(year_of_birth AS VARCHAR), COUNT(*) FROM person GROUP BY 1",
    "SELECT list_value(1) FROM person",
    "SELECT COUNT(*) FROM person USING SAMPLE 10",
    "SELECT DISTINCT gender_concept_id FROM person",
    "DESCRIBE person",
    "EXPORT DATABASE '/tmp/x'",
    "CREATE TABLE x AS SELECT 1",
    "",
]

PLAN_REFUSALS = [
    "SELECT person_id FROM person",
    "SELECT person_id, COUNT(*) FROM measurement GROUP BY person_id",
    "SELECT person_id + 1 AS p, COUNT(*) FROM measurement GROUP BY 1",
    "SELECT COUNT(*) FROM secret_table",
    "SELECT COUNT(*) FROM duckdb_tables",
    "SELECT COUNT(*) FROM information_schema.tables",
    "SELECT SUM(_spe_row_rank) FROM measurement",
    "SELECT COUNT(*) FROM measurement a JOIN condition_occurrence b "
    "ON a.measurement_id = b.condition_occurrence_id",
    "SELECT SUM(measurement_id) FROM measurement",
    "SELECT COUNT(DISTINCT measurement_concept_id) FROM measurement",
    "SELECT SUM(value_as_number) / COUNT(*) FROM measurement",
    "SELECT measurement_concept_id FROM measurement GROUP BY 1",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = Path(tmp_path_factory.mktemp("ds")) / "d.duckdb"
    meta = make_dataset(path, persons=200)
    return meta, path


@pytest.mark.parametrize("sql", PAYLOADS)
def test_payload_refused_at_parse_time(sql: str) -> None:
    with pytest.raises(QueryRefused) as err:
        parse(sql)
    assert "Refused" in err.value.detail


@pytest.mark.parametrize("sql", PLAN_REFUSALS)
def test_refused_at_plan_time(sql: str, dataset) -> None:  # type: ignore[no-untyped-def]
    meta, _ = dataset
    with pytest.raises(QueryRefused):
        compile_plan(parse(sql), meta, make_terms(meta), epsilon=1.0, delta=1e-6)


def test_min_max_name_the_quantile_alternative() -> None:
    with pytest.raises(QueryRefused) as err:
        parse("SELECT MIN(value_as_number) FROM measurement")
    assert "QUANTILE" in err.value.detail


def test_unpermitted_column_refused(dataset) -> None:  # type: ignore[no-untyped-def]
    meta, _ = dataset
    terms = make_terms(meta)
    grant = terms.datasets[0]
    tables = dict(grant.tables)
    tables["person"] = frozenset({"person_id", "gender_concept_id"})
    from dataclasses import replace

    narrow = replace(terms, datasets=(replace(grant, tables=tables),))
    with pytest.raises(QueryRefused):
        compile_plan(parse("SELECT year_of_birth, COUNT(*) FROM person GROUP BY 1"), meta,
                     narrow, epsilon=1.0, delta=1e-6)


def test_generated_sql_never_contains_user_text(dataset) -> None:  # type: ignore[no-untyped-def]
    meta, _ = dataset
    sql = ("SELECT COUNT(*) FROM measurement WHERE measurement_concept_id = 3004249 "
           "AND value_as_number > 1e1")
    plan = compile_plan(parse(sql), meta, make_terms(meta), epsilon=1.0, delta=1e-6)
    assert "1e1" not in (plan.where_sql or "")
    assert "CAST(10.0 AS DOUBLE)" in (plan.where_sql or "")
    assert '"_spe_row_rank" <= 5' in plan.truncation_sql


def test_unsafe_opendp_features_stay_off() -> None:
    mech.assert_safe_features()
    import opendp.mod as dp_mod

    assert set(dp_mod.GLOBAL_FEATURES).isdisjoint(mech.UNSAFE_FEATURES)
    assert "contrib" in dp_mod.GLOBAL_FEATURES


def test_quantile_scores_match_opendp() -> None:
    mech.assert_safe_features()
    data = [0, 1, 1, 2, 3, 3, 4, 5, 5, 5, 2, 2]
    candidates = [0, 1, 2, 3, 4, 5]
    for alpha in (0.1, 0.3, 0.5, 0.9):
        ref = dp.t.make_quantile_score_candidates(
            dp.vector_domain(dp.atom_domain(T=int)), dp.symmetric_distance(),
            candidates=candidates, alpha=alpha)
        hist = [data.count(c) for c in candidates]
        ours = mech.quantile_scores(hist, round(alpha * mech.ALPHA_DEN))
        theirs = [int(s) for s in ref(data)]
        ratio = theirs[0] / ours[0] if ours[0] else theirs[1] / ours[1]
        assert [o * ratio for o in ours] == pytest.approx(theirs)
        # Their sensitivity relative to their scale equals ours: max(a, D - a) per row.
        a = round(alpha * mech.ALPHA_DEN)
        assert ref.map(1) == pytest.approx(max(a, mech.ALPHA_DEN - a) * ratio)


def test_cost_is_a_pure_function_of_the_plan(dataset) -> None:  # type: ignore[no-untyped-def]
    meta, _ = dataset
    terms = make_terms(meta)
    sql = ("SELECT condition_concept_id, COUNT(*), AVG(value_as_number) FROM measurement m "
           "JOIN condition_occurrence c ON m.person_id = c.person_id GROUP BY 1")
    a = prepare(sql, meta, terms, epsilon=0.7, delta=1e-6).cost
    b = prepare(sql, meta, terms, epsilon=0.7, delta=1e-6).cost
    assert (a.epsilon, a.delta) == (b.epsilon, b.delta)
    assert a.epsilon <= 0.7
    assert 0 < a.delta <= 1e-6
    public = prepare("SELECT gender_concept_id, COUNT(*) FROM person GROUP BY 1", meta, terms,
                     epsilon=0.7, delta=1e-6).cost
    assert public.delta == 0.0
