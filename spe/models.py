"""Import every model module so that ``Base.metadata`` knows all tables (for alembic)."""

from spe.audit import models as audit_models
from spe.datasets import models as dataset_models

__all__ = ["audit_models", "dataset_models"]
