"""Check a permit's dataset grants against the dataset registry.

``check_grants(session, grants, loc_prefix)`` returns one ``{loc, msg}`` error per unknown
dataset, table or column (named in the message), or for internal columns that are never
grantable. It reads only the registered metadata, never the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from permits.schemas import DatasetGrantIn
from spe.datasets.metadata import ROW_RANK_COLUMN, DatasetMetadata
from spe.datasets.models import DatasetRecord


def load_metadata(session: Session, names: Sequence[str]) -> dict[str, DatasetMetadata]:
    """Metadata of the registered datasets among ``names``."""
    if not names:
        return {}
    rows = session.execute(
        select(DatasetRecord.name, DatasetRecord.meta).where(DatasetRecord.name.in_(names))
    ).all()
    return {name: DatasetMetadata.model_validate(meta) for name, meta in rows}


def _internal(column: str, table_meta: Any) -> bool:
    rank = getattr(table_meta, "row_rank_column", None) or ROW_RANK_COLUMN
    return column == rank or column.startswith("_spe_")


def check_grants(session: Session, grants: Sequence[DatasetGrantIn],
                 loc_prefix: Sequence[str | int] = ("body", "datasets")) -> list[dict[str, Any]]:
    registered = load_metadata(session, [g.dataset for g in grants])
    errors: list[dict[str, Any]] = []
    for i, grant in enumerate(grants):
        loc = [*map(str, loc_prefix), str(i)]
        meta = registered.get(grant.dataset)
        if meta is None:
            errors.append({"loc": [*loc, "dataset"],
                           "msg": f"unknown dataset {grant.dataset!r}: not in the registry"})
            continue
        for table, columns in grant.tables.items():
            table_meta = meta.tables.get(table)
            if table_meta is None:
                errors.append({"loc": [*loc, "tables", table],
                               "msg": f"unknown table {table!r} in dataset {grant.dataset!r}"})
                continue
            known = {c.name for c in table_meta.columns}
            unknown = [c for c in columns if c not in known or _internal(c, table_meta)]
            if unknown:
                errors.append({"loc": [*loc, "tables", table],
                               "msg": f"unknown columns in {grant.dataset}.{table}: "
                               + ", ".join(repr(c) for c in unknown)})
    return errors
