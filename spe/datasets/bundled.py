"""The bundled synthetic dataset ``demo`` that ``spe up`` provides on first start.

Contract of ``ensure_demo_dataset(settings, db, persons, principal)``: if a dataset ``demo``
is registered and its store file exists, reuse it; otherwise generate ``persons`` synthetic
persons (seed ``DEMO_SEED``, Parquet) into ``settings.data_dir/demo-source`` and ingest them as
``demo`` (audited like any ingest). Returns a one-line description for the start-up banner.
"""

from __future__ import annotations

import shutil

from spe.auth.principal import Principal
from spe.config import Settings
from spe.datasets import generator, registry
from spe.datasets.ingest import ingest
from spe.db import Database
from spe.errors import NotFound

DEMO_NAME = "demo"
DEMO_SEED = 20240101


def _describe(info: registry.DatasetInfo, how: str) -> str:
    persons = info.metadata.tables["person"].row_count if "person" in info.metadata.tables else 0
    return (f"{info.name}: {persons:,} persons, {info.total_rows:,} rows in "
            f"{len(info.metadata.tables)} OMOP tables ({how})")


def ensure_demo_dataset(settings: Settings, db: Database, persons: int,
                        principal: Principal) -> str:
    """Make sure dataset ``demo`` exists (see module docstring); describe it."""
    try:
        info = registry.get_dataset(db, DEMO_NAME)
    except NotFound:
        info = None
    if info is not None:
        if registry.dataset_path(settings, info).is_file():
            return _describe(info, "reused")
        registry.remove_dataset(db, settings, DEMO_NAME, principal)
    source = settings.data_dir / "demo-source"
    if source.exists():
        shutil.rmtree(source)
    generator.generate(source, persons, seed=DEMO_SEED, fmt="parquet", progress=True)
    ingest(db, settings, DEMO_NAME, source, principal, progress=True)
    return _describe(registry.get_dataset(db, DEMO_NAME), "generated now")
