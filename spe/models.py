"""Import every model module so that ``Base.metadata`` knows all tables (for alembic)."""

from permits import models as permit_models
from spe.airlock import models as airlock_models
from spe.audit import models as audit_models
from spe.auth import models as auth_models
from spe.budget import models as budget_models
from spe.datasets import models as dataset_models
from spe.web import models as web_models
from workspaces import models as workspace_models

__all__ = [
    "airlock_models",
    "audit_models",
    "auth_models",
    "budget_models",
    "dataset_models",
    "permit_models",
    "web_models",
    "workspace_models",
]
