"""What a permit allows, as the enforcing parts of the SPE see it.

``PermitTerms`` is the read-only view that the DP engine, the workspaces and the airlock take
from a permit (``permits.service.get_terms``). It is computed from the newest version of the
permit and its *effective* status (a permit past ``valid_until`` is ``expired`` even before the
expiry sweeper has recorded it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class PermitStatus(StrEnum):
    """Effective status. ``pending`` (before valid_from) is never stored: it is derived from
    the clock, as ``expired`` is before the sweeper records it. Only ``active`` is usable."""

    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    EXPIRED = "expired"
    PENDING = "pending"


class AccessMode(StrEnum):
    DP_ONLY = "dp_only"
    PSEUDONYMISED = "pseudonymised"


@dataclass(frozen=True)
class DatasetGrant:
    """One dataset of the permit and, per table, the columns allowed."""

    dataset: str
    tables: dict[str, frozenset[str]]


@dataclass(frozen=True)
class PrivacyBudget:
    epsilon: float
    delta: float
    max_epsilon_per_query: float
    per_person_epsilon: float | None = None


@dataclass(frozen=True)
class ExportPolicy:
    min_cell_count: int = 10
    allowed_kinds: frozenset[str] = frozenset({"csv", "parquet", "png", "pdf", "txt"})
    reviewers: int = 2
    #: Limits of one export request (None: the SPE's settings decide).
    max_files: int | None = None
    max_bytes: int | None = None
    max_rows: int | None = None
    #: ACRO's dominance k and p-percent p, or tighter (older permits: ACRO's defaults).
    dominance_k: float = 0.9
    p_percent: float = 0.1


@dataclass(frozen=True)
class ComputeQuota:
    gpus: int = 0
    cpus: float = 1.0
    memory_mb: int = 2048
    disk_mb: int = 1024


@dataclass(frozen=True)
class PermitTerms:
    permit_id: str
    version: int
    access_body: str
    status: PermitStatus
    valid_from: datetime
    valid_until: datetime
    persons: frozenset[str]
    access_mode: AccessMode
    datasets: tuple[DatasetGrant, ...]
    budget: PrivacyBudget
    export: ExportPolicy = field(default_factory=ExportPolicy)
    compute: ComputeQuota = field(default_factory=ComputeQuota)
    purposes: frozenset[str] = frozenset()
    retention_days: int = 183
    #: Frozen by the incident switch (``spe.audit.incident``): not usable whatever its status.
    frozen: bool = False

    @property
    def usable(self) -> bool:
        return self.status is PermitStatus.ACTIVE and not self.frozen

    @property
    def state_text(self) -> str:
        """Why the permit is (not) usable, for refusal messages: its status or 'frozen'."""
        return "frozen (incident)" if self.frozen else self.status.value

    def names(self, person: str) -> bool:
        return person in self.persons

    def allowed_columns(self, dataset: str, table: str) -> frozenset[str]:
        for grant in self.datasets:
            if grant.dataset == dataset:
                return grant.tables.get(table, frozenset())
        return frozenset()
