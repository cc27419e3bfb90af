"""Every OMOP CDM 5.4 table is bound to the patient, or refused.

The attack this closes: OMOP keeps patient data in tables without ``person_id`` (NLP snippets
in ``note_nlp``, charges in ``cost``, addresses in ``location``). Treated as public reference
data, such a table could be joined without any per-person bound, and one patient's snippet was
released with certainty. For each table of the spec this test tries to read it alongside
per-person data and shows either a refusal, or that the exact pre-noise statistics of two
neighbouring datasets (one person added, with many rows and extreme values in every table)
differ by no more than the sensitivity the mechanisms are calibrated to. A control computes
the same statistic without the engine's bounds and shows the target moves it far more, so
the test could fail.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from spe.auth.principal import operator_principal
from spe.config import Settings
from spe.datasets.ingest import ingest
from spe.datasets.metadata import DatasetMetadata, TableMeta
from spe.datasets.omop_spec import load_spec
from spe.db import Database
from spe.dp import mechanisms as mech
from spe.dp.engine import distinct_sql, row_stats_sql
from spe.dp.plan import QueryPlan
from spe.dp.runner import prepare
from spe.dp.testing import make_terms
from spe.errors import IngestError, QueryRefused
from tests.security.omop_neighbours import SECRET, TARGET_ROWS, write_export

OPERATOR = operator_principal("tester")


class Pair:
    def __init__(self, meta: DatasetMetadata, with_path: Path, without_path: Path) -> None:
        self.meta = meta
        self.paths = (with_path, without_path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = Path(tmp_path_factory.mktemp("units"))
    db = Database(f"sqlite:///{base / 'control.db'}")
    db.upgrade()
    settings = Settings(data_dir=base / "var")
    with_ = ingest(db, settings, "with", write_export(base / "with", True), OPERATOR)
    without = ingest(db, settings, "without", write_export(base / "without", False), OPERATOR)
    # Both copies are read here with plain connections (the engine's own are tested elsewhere).
    a, b = base / "a.duckdb", base / "b.duckdb"
    shutil.copy(with_.path, a)
    shutil.copy(without.path, b)
    yield Pair(with_.metadata, a, b)
    db.dispose()


def _plan(meta: DatasetMetadata, sql: str) -> QueryPlan:
    return prepare(sql, meta, make_terms(meta), epsilon=1.0, delta=1e-6).plan


def _stats(path: Path, plan: QueryPlan) -> dict[tuple[Any, ...], dict[str, int]]:
    sql, names = row_stats_sql(plan)
    nk = len(plan.keys)
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {tuple(r[:nk]): {n: int(v or 0) for n, v in zip(names, r[nk:], strict=True)}
               for r in con.execute(sql).fetchall()}
        if any(a.kind == "count_distinct" for a in plan.aggregates):
            for r in con.execute(distinct_sql(plan, 4242)).fetchall():
                out.setdefault(tuple(r[:nk]), {})["distinct"] = int(r[nk] or 0)
    finally:
        con.close()
    return out


def _l1(a: dict[tuple[Any, ...], dict[str, int]], b: dict[tuple[Any, ...], dict[str, int]]
        ) -> dict[str, int]:
    diff: dict[str, int] = {}
    for key in set(a) | set(b):
        for name in set(a.get(key, {})) | set(b.get(key, {})):
            d = abs(a.get(key, {}).get(name, 0) - b.get(key, {}).get(name, 0))
            diff[name] = diff.get(name, 0) + d
    return diff


def _sensitivity(plan: QueryPlan, name: str) -> int:
    """The L1 sensitivity the mechanisms are calibrated to for statistic ``name``."""
    k = plan.rows_per_person
    if name in ("rows",) or name.startswith("nvals"):
        return k
    if name == "distinct":
        return mech.distinct_bound(plan)
    index = int(name.removeprefix("sumsq").removeprefix("sum"))
    agg = plan.aggregates[index]
    return k * mech.row_bound(agg, squared=name.startswith("sumsq"))


def _check_bound(pair: Pair, sql: str) -> QueryPlan:
    plan = _plan(pair.meta, sql)
    diff = _l1(_stats(pair.paths[0], plan), _stats(pair.paths[1], plan))
    assert diff, "the statistics must be computed"
    for name, d in diff.items():
        assert d <= _sensitivity(plan, name), (sql, name, d)
    return plan


def _numeric(table: TableMeta) -> str | None:
    for col in table.columns:
        if col.type == "DOUBLE":
            return col.name
    return None


def _text(table: TableMeta) -> str | None:
    for col in table.columns:
        if col.type == "VARCHAR":
            return col.name
    return None


def _aggregates(table: TableMeta, alias: str) -> str:
    parts = ["COUNT(*)"]
    num = _numeric(table)
    if num is not None:
        parts.append(f"SUM(LEAST(GREATEST({alias}.{num}, 0), 1000))")
    return ", ".join(parts)


def _join_to_person(meta: DatasetMetadata, table: TableMeta) -> str:
    """FROM clause reading ``table`` (alias x) alongside per-person data."""
    if table.kind == "person":
        if table.name == "person":
            return "person x"
        return f"person p JOIN {table.name} x ON x.person_id = p.person_id"
    if table.kind == "linked":
        hop = table.link[0]
        for candidate in table.link:  # a hop whose parent holds rows in this export
            if candidate.table in ("drug_exposure", "visit_occurrence", "note", "episode"):
                hop = candidate
                break
        return (f"{hop.table} y JOIN {table.name} x ON x.{hop.column} = "
                f"y.{hop.parent_column}")
    raise AssertionError(table.kind)


TABLES = sorted(load_spec())


@pytest.mark.parametrize("name", TABLES)
def test_every_table_is_bound_to_a_person_or_refused(pair: Pair, name: str) -> None:
    table = pair.meta.tables[name]
    meta = pair.meta
    if table.kind == "refused":
        first = next(c.name for c in table.columns if c.type == "BIGINT")
        for sql in (f"SELECT COUNT(*) FROM {name}",
                    f"SELECT COUNT(*) FROM person p JOIN {name} x ON x.{first} = p.person_id"):
            with pytest.raises(QueryRefused) as info:
                _plan(meta, sql)
            assert name in str(info.value) and "kind: public" in str(info.value)
        return
    if table.kind == "public":
        key = table.unique_key
        person = meta.tables["person"]
        if len(key) != 1:
            with pytest.raises(QueryRefused):
                _plan(meta, f"SELECT COUNT(*) FROM person p JOIN {name} x "
                      f"ON x.{table.columns[0].name} = p.person_id")
            return
        ktype = table.column(key[0]).type  # type: ignore[union-attr]
        pcol = next(c.name for c in person.columns if c.type == ktype and c.name != "person_id")
        _check_bound(pair, f"SELECT COUNT(*), COUNT(DISTINCT p.person_id) FROM person p "
                     f"JOIN {name} x ON x.{key[0]} = p.{pcol}")
        return
    frm = _join_to_person(meta, table)
    plan = _check_bound(pair, f"SELECT {_aggregates(table, 'x')} FROM {frm}")
    if table.kind == "person" and not plan.tables[-1].one_per_person:
        assert plan.rows_per_person < TARGET_ROWS  # the target's rows are really truncated
    text = _text(table)
    if text is not None:  # a thresholded group key: the target's own text
        _check_bound(pair, f"SELECT x.{text}, COUNT(*) FROM {frm} GROUP BY x.{text}")


@pytest.mark.parametrize("name", ["note_nlp", "cost", "episode_event"])
def test_control_without_the_bound_the_target_shows(pair: Pair, name: str) -> None:
    """The same statistic without truncation moves far beyond the sensitivity: the test above
    would catch a table whose rows were not bound to their person."""
    table = pair.meta.tables[name]
    plan = _plan(pair.meta, f"SELECT COUNT(*) FROM {_join_to_person(pair.meta, table)}")
    counts = _untruncated_rows(pair, plan)
    assert counts[0] - counts[1] > 5 * plan.rows_per_person


def _untruncated_rows(pair: Pair, plan: QueryPlan) -> list[int]:
    """COUNT(*) over the plan's FROM / JOIN without its rank filters, in each dataset."""
    counts = []
    for path in pair.paths:
        con = duckdb.connect(str(path), read_only=True)
        row = con.execute(f"SELECT COUNT(*) FROM {plan.join_sql}").fetchone()
        con.close()
        assert row is not None
        counts.append(int(row[0]))
    return counts


def test_snippet_attack_is_bounded(pair: Pair) -> None:
    """The reported attack: the target's NLP snippet as a group key. Its exact count is at most
    k (so the DP threshold decides, not the data), where it was TARGET_ROWS x notes."""
    plan = _plan(pair.meta, "SELECT n.snippet, COUNT(*) FROM note t JOIN note_nlp n "
                 "ON n.note_id = t.note_id GROUP BY n.snippet")
    stats = _stats(pair.paths[0], plan)
    # (The kept note_nlp rows may all hang off notes ranked out: then the count is 0.)
    assert stats.get((SECRET,), {}).get("rows", 0) <= plan.rows_per_person
    assert (SECRET,) not in _stats(pair.paths[1], plan)


def test_linked_tables_join_only_on_their_declared_path(pair: Pair) -> None:
    meta = pair.meta
    for sql in ("SELECT COUNT(*) FROM person p JOIN note_nlp n ON n.note_nlp_id = p.person_id",
                "SELECT COUNT(*) FROM note t JOIN note_nlp n ON n.note_nlp_id = t.note_id",
                "SELECT COUNT(*) FROM visit_occurrence v JOIN cost c "
                "ON c.cost_id = v.visit_occurrence_id"):
        with pytest.raises(QueryRefused):
            _plan(meta, sql)
    plan = _plan(meta, "SELECT COUNT(*) FROM drug_exposure d JOIN cost c "
                 "ON c.cost_event_id = d.drug_exposure_id")
    # The join carries the hop's domain and the persons' equality, whatever the ids say.
    assert "'Drug'" in plan.join_sql and "_spe_person_id" in plan.join_sql


def test_reference_join_cannot_reach_a_linked_table_by_its_key(pair: Pair) -> None:
    """Joining a linked table as if it were reference data (on its unique key) is refused."""
    with pytest.raises(QueryRefused):
        _plan(pair.meta, "SELECT COUNT(*) FROM person p JOIN note_nlp n "
              "ON n.note_nlp_id = p.year_of_birth")


def test_unresolved_linked_row_is_an_ingest_error(tmp_path: Path, sqlite_db: Database) -> None:
    src = write_export(tmp_path / "src", False)
    path = src / "note_nlp.csv"
    lines = path.read_text().splitlines()
    fields = lines[1].split(",")
    fields[1] = "987654321"  # note_id of no note
    lines.insert(2, ",".join(["77777", *fields[1:]]))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(IngestError) as info:
        ingest(sqlite_db, Settings(data_dir=tmp_path / "var"), "bad", src, OPERATOR)
    text = str(info.value)
    assert "note_nlp.csv line 3" in text and "note -> " not in text
    assert "note_id -> note.note_id" in text and "987654321" not in text


def test_declared_public_and_refused_kinds(tmp_path: Path, sqlite_db: Database) -> None:
    src = write_export(tmp_path / "src", False)
    (src / "spe-metadata.yaml").write_text(
        "version: 1\ntables:\n  location: {kind: public}\n  cost: {kind: refused}\n")
    meta = ingest(sqlite_db, Settings(data_dir=tmp_path / "var"), "decl", src,
                  OPERATOR).metadata
    assert meta.tables["location"].kind == "public"
    assert meta.tables["cost"].kind == "refused"
    assert meta.tables["note_nlp"].kind == "linked"
    _plan(meta, "SELECT COUNT(*) FROM person p JOIN location l ON l.location_id = "
          "p.location_id")
    with pytest.raises(QueryRefused):
        _plan(meta, "SELECT COUNT(*) FROM cost")


@pytest.mark.parametrize("declaration", [
    "person: {kind: public}",
    "note: {kind: linked, link: [{column: note_id, table: note, parent_column: note_id}]}",
    "location: {kind: linked, link: [{column: location_id, table: person, "
    "parent_column: year_of_birth}]}",
    "location: {kind: linked}",
    "location: {link: [{column: location_id, table: person, parent_column: person_id}]}",
])
def test_bad_kind_declarations_are_refused(tmp_path: Path, sqlite_db: Database,
                                          declaration: str) -> None:
    src = write_export(tmp_path / "src", False)
    (src / "spe-metadata.yaml").write_text(f"version: 1\ntables:\n  {declaration}\n")
    with pytest.raises(IngestError) as info:
        ingest(sqlite_db, Settings(data_dir=tmp_path / "var"), "decl", src, OPERATOR)
    assert "tables." in str(info.value) or "link" in str(info.value)


def test_old_metadata_with_public_values_spelled_twice_is_refused(pair: Pair) -> None:
    """Metadata recorded before ingest normalised public values: the planner checks again."""
    meta = pair.meta.model_copy(deep=True)
    column = meta.tables["person"].column("gender_concept_id")
    assert column is not None
    column.public_values = [8507, "8507", 8532]
    with pytest.raises(QueryRefused):
        _plan(meta, "SELECT gender_concept_id, COUNT(*) FROM person GROUP BY 1")
    column.public_values = [8507, 8507, 8532]  # an exact repeat is released once
    plan = _plan(meta, "SELECT gender_concept_id, COUNT(*) FROM person GROUP BY 1")
    assert plan.keys[0].public_values == (8507, 8532)


def test_metadata_without_kinds_is_read_safely() -> None:
    """Metadata recorded before kinds existed: no person column means public only for the
    default vocabularies, refused otherwise (never guessed from column names)."""
    old = {"name": "note_nlp", "columns": [], "row_count": 1, "privacy_unit": None}
    assert TableMeta.model_validate(old).kind == "refused"
    assert TableMeta.model_validate({**old, "name": "concept"}).kind == "public"
    assert TableMeta.model_validate({**old, "name": "note", "privacy_unit": "person_id"}
                                    ).kind == "person"


def _derivable(table: TableMeta) -> tuple[str | None, str | None]:
    """(a DATE column, a DOUBLE or BIGINT column other than ids) of ``table``, or None."""
    date = next((c.name for c in table.columns if c.type == "DATE"), None)
    num = next((c.name for c in table.columns if c.type == "DOUBLE"), None) or next(
        (c.name for c in table.columns if c.type == "BIGINT" and not c.name.endswith("_id")),
        None)
    return date, num


def test_per_person_derived_tables_move_one_row_per_person(pair: Pair) -> None:
    """A derived table (``(SELECT person_id, MIN(..) .. GROUP BY person_id)``, or WITH) over
    every per-person table: the target (TARGET_ROWS rows of extreme values in each table) moves
    the exact statistics by no more than one row's worth (K = 1), alone or joined to person,
    and by the other table's k when joined to a truncated table. Control: the derived table
    really holds the target (one more row with it than without)."""
    checked = 0
    for name in TABLES:
        table = pair.meta.tables[name]
        if table.kind != "person" or name == "person":
            continue
        date, num = _derivable(table)
        if date is None and num is None:
            continue
        aggs = ", ".join(x for x in (f"MIN({date}) AS first" if date else "",
                                     f"MAX({num}) AS top" if num else "", "COUNT(*) AS n") if x)
        derived = f"(SELECT person_id, {aggs} FROM {name} GROUP BY person_id)"
        mean = "AVG(LEAST(GREATEST(f.top, 0), 1000))" if num else ""
        outer = ", ".join(x for x in ("COUNT(*)", "SUM(f.n)", mean) if x)
        plans = [_check_bound(pair, f"SELECT {outer} FROM {derived} f"),
                 _check_bound(pair, f"WITH f AS {derived} SELECT {outer}, "
                              "COUNT(DISTINCT p.person_id) FROM f JOIN person p "
                              "ON f.person_id = p.person_id")]
        if date:
            plans.append(_check_bound(pair, f"SELECT year(f.first) AS y, COUNT(*) FROM "
                                      f"{derived} f GROUP BY 1"))
        assert all(p.rows_per_person == 1 for p in plans), name
        other = "measurement" if name != "measurement" else "observation"
        joined = _check_bound(pair, f"SELECT COUNT(*), SUM(f.n) FROM {derived} f JOIN {other} o "
                              "ON o.person_id = f.person_id")
        assert joined.rows_per_person == pair.meta.tables[other].max_rows_per_person
        rows = _untruncated_rows(pair, plans[0])
        assert rows[0] - rows[1] == 1, name
        checked += 1
    assert checked >= 10


DERIVED_REFUSALS = [
    # not a per-person table, or the unit reached another way
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM note_nlp GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT concept_id, COUNT(*) AS n FROM concept GROUP BY concept_id) f",
    # grouping other than by the unit alone
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM measurement "
    "GROUP BY person_id, measurement_concept_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM measurement) f",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM measurement GROUP BY 1) f",
    # the unit copied into a value column, or a non-unit column selected raw
    "SELECT COUNT(*) FROM (SELECT person_id, MIN(person_id) AS n FROM measurement "
    "GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id AS pid, COUNT(*) AS n FROM measurement "
    "GROUP BY person_id) f",
    # a value named like the person: joined as the person, one person row would meet many
    "SELECT COUNT(*) FROM (SELECT MIN(measurement_concept_id) AS person_id, COUNT(*) AS n "
    "FROM measurement GROUP BY person_id) f JOIN person p ON f.person_id = p.person_id",
    "SELECT COUNT(*) FROM (SELECT MIN(measurement_concept_id) AS \"PERSON_ID\" "
    "FROM measurement GROUP BY person_id) f JOIN person p ON f.person_id = p.person_id",
    "SELECT COUNT(*) FROM (SELECT person_id, MIN(measurement_concept_id) AS Person_Id "
    "FROM measurement GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n, MIN(measurement_date) AS N "
    "FROM measurement GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, measurement_concept_id, COUNT(*) AS n "
    "FROM measurement GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, MIN(value_source_value) AS n FROM measurement "
    "GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, MIN(value_as_number + 1) AS n FROM measurement "
    "GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, SUM(value_as_number) AS n FROM measurement "
    "GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(DISTINCT measurement_concept_id) AS n "
    "FROM measurement GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, MIN(_spe_row_rank) AS n FROM measurement "
    "GROUP BY person_id) f",
    # joins, nesting, clauses inside
    "SELECT COUNT(*) FROM (SELECT m.person_id, COUNT(*) AS n FROM measurement m JOIN person p "
    "ON m.person_id = p.person_id GROUP BY m.person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM (SELECT person_id, COUNT(*) AS "
    "k FROM measurement GROUP BY person_id) g GROUP BY person_id) f",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM measurement GROUP BY person_id "
    "HAVING COUNT(*) > 3) f",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM measurement GROUP BY person_id "
    "LIMIT 5) f",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM measurement GROUP BY person_id)",
    "WITH f AS (SELECT person_id, COUNT(*) AS n FROM measurement GROUP BY person_id), "
    "g AS (SELECT person_id, COUNT(*) AS n FROM f GROUP BY person_id) SELECT COUNT(*) FROM g",
    "WITH RECURSIVE f AS (SELECT person_id, COUNT(*) AS n FROM measurement GROUP BY person_id) "
    "SELECT COUNT(*) FROM f",
    "WITH measurement AS (SELECT person_id, COUNT(*) AS n FROM person GROUP BY person_id) "
    "SELECT COUNT(*) FROM measurement",
    "WITH f(a, b) AS (SELECT person_id, COUNT(*) AS n FROM measurement GROUP BY person_id) "
    "SELECT COUNT(*) FROM f",
    # subqueries anywhere else
    "SELECT COUNT(*) FROM measurement WHERE value_as_number > (SELECT 1)",
    "SELECT (SELECT COUNT(*) FROM person) AS c, COUNT(*) FROM measurement",
    # the outer query may not release or group by the derived person id
    "SELECT f.person_id, COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM measurement "
    "GROUP BY person_id) f GROUP BY 1",
    "SELECT COUNT(*) FROM (SELECT person_id, COUNT(*) AS n FROM measurement "
    "GROUP BY person_id) f JOIN person p ON f.n = p.person_id",
]


@pytest.mark.parametrize("sql", DERIVED_REFUSALS)
def test_derived_tables_outside_the_shape_are_refused(pair: Pair, sql: str) -> None:
    with pytest.raises(QueryRefused) as info:
        _plan(pair.meta, sql)
    assert str(info.value).startswith("Refused:") or "cannot be queried" in str(info.value)
