"""Neighbouring OMOP CDM 5.4 exports for privacy-unit tests: every table of the spec, with and
without one target person who has many rows and extreme values everywhere.

``write_export(out, with_target)`` writes one CSV per CDM table. Per-person tables get
``ROWS`` rows per person (``TARGET_ROWS`` for the target); the linked tables point at their
parents (``note_nlp`` at notes, ``episode_event`` at episodes, ``cost`` at drug exposures and
visits through ``cost_domain_id``), ``TARGET_ROWS`` rows per parent row of the target; every
other table holds the same few rows in both exports. Test data only: all values are made up.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from spe.datasets.omop_spec import FieldSpec, TableSpec, load_spec

PERSONS = tuple(range(1, 21))
TARGET = 999
ROWS = 2
TARGET_ROWS = 30
EXTREME = 10**9
SECRET = "secret-snippet-of-the-target"
LINK_PARENTS = {"note_nlp": "note", "episode_event": "episode"}
COST_EVENTS = {"drug_exposure": "Drug", "visit_occurrence": "Visit"}


def _value(field: FieldSpec, row_id: int, target: bool) -> str:
    if field.duckdb_type == "BIGINT":
        return str(EXTREME + row_id if target else row_id % 7 + 1)
    if field.duckdb_type == "DOUBLE":
        return str(float(EXTREME) if target else 1.5)
    if field.duckdb_type == "DATE":
        return "2021-03-04"
    if field.duckdb_type == "TIMESTAMP":
        return "2021-03-04 05:06:07"
    return SECRET if target else "common"


def _row(spec: TableSpec, row_id: int, target: bool, fixed: dict[str, object]) -> list[str]:
    out = []
    for field in spec.fields:
        if field.name in fixed:
            out.append(str(fixed[field.name]))
        elif field.primary_key:
            out.append(str(row_id))
        else:
            out.append(_value(field, row_id, target))
    return out


def _person_rows(spec: TableSpec, persons: tuple[int, ...]) -> Iterator[tuple[int, int, bool]]:
    """(row id, person, target) of a per-person table."""
    for pid in persons:
        n = 1 if spec.name == "person" else (TARGET_ROWS if pid == TARGET else ROWS)
        for j in range(n):
            yield (pid if spec.name == "person" else pid * 1000 + j), pid, pid == TARGET


def write_export(out: Path, with_target: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    specs = load_spec()
    persons = PERSONS + ((TARGET,) if with_target else ())
    ids: dict[str, list[tuple[int, bool]]] = {}
    rows: dict[str, list[list[str]]] = {}
    for name, spec in specs.items():
        if not spec.has_person_id:
            continue
        table_rows = []
        for row_id, pid, target in _person_rows(spec, persons):
            table_rows.append(_row(spec, row_id, target, {"person_id": pid}))
            ids.setdefault(name, []).append((row_id, target))
        rows[name] = table_rows
    for child, parent in LINK_PARENTS.items():
        spec = specs[child]
        key = specs[parent].primary_key[0]
        rows[child] = []
        for parent_id, target in ids[parent]:
            for i in range(TARGET_ROWS if target else 1):
                rows[child].append(_row(spec, parent_id * 100 + i, target, {key: parent_id}))
    rows["cost"] = []
    for table, domain in COST_EVENTS.items():
        for event_id, target in ids[table]:
            for _ in range(TARGET_ROWS if target else 1):
                rows["cost"].append(_row(specs["cost"], len(rows["cost"]) + 1, target,
                                         {"cost_event_id": event_id,
                                          "cost_domain_id": domain}))
    for name, spec in specs.items():
        if name not in rows:  # reference and other tables: the same rows in both exports
            rows[name] = [_row(spec, i, False, {}) for i in range(1, 4)]
    for name, table_rows in rows.items():
        with (out / f"{name}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(specs[name].column_names)
            writer.writerows(table_rows)
    return out
