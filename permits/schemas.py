"""Pydantic schemas at the API edge: what access bodies send and what the SPE returns.

* ``PermitContent``: every field of a permit an access body decides (TEHDAS2 data permit
  template fields plus the technical terms the SPE enforces). One version's snapshot is
  exactly a ``PermitContent``. Validated as a whole, so cross-field rules (dates ordered, budget
  per query within the total, a justification for pseudonymised access) name the field at fault.
* ``PermitCreate``: the body of ``POST /v1/permits`` (= ``PermitContent``).
* ``PermitUpdate``: the body of ``PATCH /v1/permits/{id}``; every field optional, ``null`` or
  absent means unchanged. The validity window is not amendable (use ``/extend``), nor is the
  reference number.
* ``PermitPublic``: what is returned; adds server-set fields (id, access body, effective status,
  version, ETag, timestamps). Internal columns never leak.

Every model forbids unknown fields; every string and list is bounded; floats must be finite.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from permits.purposes import Purpose
from permits.terms import AccessMode, PermitStatus
from spe.schema_types import IsoDateTime

#: Longest access period a permit may be issued for (EHDS Art 68(12)): 10 years.
MAX_PERMIT_DURATION = timedelta(days=3653)
#: Longest single extension (EHDS Art 68(12): extendable once, for at most 10 years).
MAX_EXTENSION = timedelta(days=3653)
#: Data are deleted from the SPE within 6 months of expiry (Art 68): retention is bounded.
MAX_RETENTION_DAYS = 183

Identifier = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", max_length=63)
]
DatasetName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", max_length=64)
]
Username = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9._@+-]{0,99}$", max_length=100),
]
Text = Annotated[str, StringConstraints(min_length=1, max_length=4000, strip_whitespace=True)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=300, strip_whitespace=True)]
Reference = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._/:#-]{0,127}$", max_length=128)
]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class FileKind(StrEnum):
    """File kinds an export may carry (checked by the airlock)."""

    CSV = "csv"
    TSV = "tsv"
    PARQUET = "parquet"
    JSON = "json"
    TXT = "txt"
    MD = "md"
    PNG = "png"
    JPEG = "jpeg"
    SVG = "svg"
    PDF = "pdf"
    XLSX = "xlsx"


DEFAULT_FILE_KINDS = [FileKind.CSV, FileKind.PARQUET, FileKind.PNG, FileKind.PDF, FileKind.TXT]


def _no_duplicates(values: list[Any], what: str) -> list[Any]:
    seen: set[Any] = set()
    dups = [v for v in values if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"{what} listed more than once: {', '.join(map(str, sorted(set(dups))))}")
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=4000)


class HealthDataUser(_Strict):
    """Who holds the permit (the health data user) and who controls the processing."""

    organisation: ShortText = Field(description="Name of the health data user (organisation "
                                    "or natural person).")
    kind: Literal["legal_person", "natural_person"] = "legal_person"
    representative: ShortText | None = Field(None, description="Legal representative.")
    principal_investigator: ShortText = Field(description="Principal investigator.")
    controller: ShortText | None = Field(None, description="Controller of the processing.")


class DatasetGrantIn(_Strict):
    """One dataset and, per table, the columns allowed (names checked against the registry)."""

    dataset: DatasetName
    tables: dict[Identifier, Annotated[list[Identifier], Field(min_length=1, max_length=500)]] = (
        Field(min_length=1, max_length=64)
    )

    @field_validator("tables")
    @classmethod
    def _unique_columns(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for table, columns in value.items():
            _no_duplicates(columns, f"columns of table {table}")
        return value


class PrivacyBudgetIn(_Strict):
    """(epsilon, delta)-DP budget of the permit. All values positive and finite."""

    epsilon: FiniteFloat = Field(gt=0, le=100, description="Total epsilon of the permit.")
    delta: FiniteFloat = Field(gt=0, lt=1, description="Total delta of the permit (0 < delta < 1).")
    max_epsilon_per_query: FiniteFloat = Field(
        gt=0, le=100, description="Largest epsilon one query may spend (at most epsilon)."
    )
    per_person_epsilon: FiniteFloat | None = Field(
        None, gt=0, le=100,
        description="Optional cap on what each authorised person may spend (at most epsilon).",
    )

    @field_validator("max_epsilon_per_query", "per_person_epsilon")
    @classmethod
    def _within_total(cls, value: float | None, info: ValidationInfo) -> float | None:
        total = info.data.get("epsilon")
        if value is not None and total is not None and value > total:
            raise ValueError(f"must not exceed the total epsilon ({total})")
        return value


class ExportPolicyIn(_Strict):
    """What may leave through the airlock, and how it is reviewed."""

    min_cell_count: int = Field(10, ge=1, le=10_000,
                                description="Smallest count a released table cell may carry.")
    allowed_kinds: list[FileKind] = Field(
        default_factory=lambda: list(DEFAULT_FILE_KINDS), min_length=1, max_length=len(FileKind),
        description="File kinds an export may carry.",
    )
    reviewers: int = Field(2, ge=1, le=10,
                           description="Independent reviewers (never the requester) per export.")
    max_files: int | None = Field(None, ge=1, le=1000,
                                  description="Most files per export request (default: the "
                                  "SPE's airlock_max_files).")
    max_bytes: int | None = Field(None, ge=1, le=10**12,
                                  description="Most bytes per export request (default: the "
                                  "SPE's airlock_max_bytes).")
    max_rows: int | None = Field(None, ge=1, le=10**9,
                                 description="Most rows per exported table (default: the SPE's "
                                 "airlock_max_rows).")
    dominance_k: float = Field(0.9, gt=0, le=0.9,
                               description="Dominance (N-K, n=2): a cell fails when its two "
                               "largest contributors hold more than this share of its total. "
                               "ACRO's 0.9 or tighter (lower).")
    p_percent: float = Field(0.1, ge=0.1, le=1.0,
                             description="p-percent: a cell fails when its total less the two "
                             "largest contributions is below this share of the largest. "
                             "ACRO's 0.1 or tighter (higher).")

    @field_validator("allowed_kinds")
    @classmethod
    def _unique_kinds(cls, value: list[FileKind]) -> list[FileKind]:
        return _no_duplicates(value, "file kinds")


class ComputeQuotaIn(_Strict):
    """Resources each workspace of the permit may use (bounded by what one host offers)."""

    gpus: int = Field(0, ge=0, le=8)
    cpus: FiniteFloat = Field(1.0, ge=0.25, le=64)
    memory_mb: int = Field(2048, ge=256, le=1_048_576)
    disk_mb: int = Field(1024, ge=64, le=4_194_304)


class PermitContent(_Strict):
    """Everything an access body decides about a permit (one version's snapshot)."""

    reference: Reference = Field(description="The access body's own permit reference number "
                                 "(e.g. sequence/year/country); unique per access body.")
    application_reference: Reference | None = Field(None, description="Reference of the "
                                                    "data access application.")
    amendment_of: Reference | None = Field(None, description="Reference of an earlier permit "
                                           "this one amends, if any.")
    title: ShortText = Field(description="Project title.")
    decision: Literal["granted", "partially_granted"] = "granted"
    not_granted: Text | None = Field(None, validate_default=True,
                                     description="What was not granted (partial decisions).")
    holder: HealthDataUser
    purposes: list[Purpose] = Field(min_length=1, max_length=len(Purpose),
                                    description="Purposes ticked from EHDS Art 53(1).")
    purpose_justification: Text
    datasets: list[DatasetGrantIn] = Field(min_length=1, max_length=32)
    access_mode: AccessMode = Field(AccessMode.DP_ONLY, description="dp_only (anonymised "
                                    "results only, the default) or pseudonymised.")
    pseudonymisation_justification: Text | None = Field(
        None, validate_default=True, description="Required when access_mode is pseudonymised.")
    spe_tools: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]] = (
        Field(default_factory=lambda: ["jupyterlab", "dp-query"], max_length=32,
              description="Tools of the SPE available to the project.")
    )
    persons: list[Username] = Field(min_length=1, max_length=200, description="Keycloak "
                                    "usernames of the natural persons entitled to process data.")
    valid_from: IsoDateTime = Field(description="Start of the access period.")
    valid_until: IsoDateTime = Field(description="End of the access period (at most 10 years "
                                       "after valid_from); the permit expires at this instant.")
    retention_days: int = Field(MAX_RETENTION_DAYS, ge=0, le=MAX_RETENTION_DAYS,
                                description="Days data stay in the SPE after the access period.")
    conditions: list[Text] = Field(default_factory=list, max_length=50)
    privacy_budget: PrivacyBudgetIn
    export_policy: ExportPolicyIn = Field(default_factory=ExportPolicyIn)
    compute_quota: ComputeQuotaIn = Field(default_factory=ComputeQuotaIn)

    @field_validator("not_granted")
    @classmethod
    def _partial_says_what(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("decision") == "partially_granted" and not value:
            raise ValueError("a partially granted permit must say what was not granted")
        return value

    @field_validator("purposes")
    @classmethod
    def _unique_purposes(cls, value: list[Purpose]) -> list[Purpose]:
        return _no_duplicates(value, "purposes")

    @field_validator("datasets")
    @classmethod
    def _unique_datasets(cls, value: list[DatasetGrantIn]) -> list[DatasetGrantIn]:
        _no_duplicates([g.dataset for g in value], "datasets")
        return value

    @field_validator("pseudonymisation_justification")
    @classmethod
    def _justified(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("access_mode") == AccessMode.PSEUDONYMISED and not value:
            raise ValueError("pseudonymised access needs a justification (EHDS Art 66)")
        return value

    @field_validator("persons", "spe_tools")
    @classmethod
    def _unique_names(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return _no_duplicates(value, str(info.field_name))

    @field_validator("valid_until")
    @classmethod
    def _window(cls, value: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("valid_from")
        if start is not None and value <= start:
            raise ValueError("valid_until must be later than valid_from")
        # The 10-year limit depends on history (one extension), so permits.service checks it.
        return value


_EXAMPLE_CONTENT: dict[str, Any] = {
    "reference": "0042/2026/FI",
    "application_reference": "APP-2026-0117",
    "title": "Statin use and cardiovascular outcomes",
    "decision": "granted",
    "holder": {
        "organisation": "University Hospital Research Institute",
        "kind": "legal_person",
        "principal_investigator": "Dr. A. Example",
        "controller": "University Hospital Research Institute",
    },
    "purposes": ["scientific_research"],
    "purpose_justification": "Observational study of statin exposure and outcomes.",
    "datasets": [{"dataset": "omop_demo",
                  "tables": {"person": ["person_id", "year_of_birth", "gender_concept_id"]}}],
    "access_mode": "dp_only",
    "persons": ["alice", "bob"],
    "valid_from": "2026-01-01T00:00:00Z",
    "valid_until": "2028-01-01T00:00:00Z",
    "retention_days": 90,
    "conditions": ["Publish results in open access."],
    "privacy_budget": {"epsilon": 5.0, "delta": 1e-6, "max_epsilon_per_query": 1.0},
    "export_policy": {"min_cell_count": 10, "allowed_kinds": ["csv", "png"], "reviewers": 2},
    "compute_quota": {"gpus": 0, "cpus": 2, "memory_mb": 4096, "disk_mb": 2048},
}


class PermitCreate(PermitContent):
    """Body of ``POST /v1/permits``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EXAMPLE_CONTENT]})


class PermitUpdate(_Strict):
    """Body of ``PATCH /v1/permits/{id}``: the fields to change; absent means unchanged."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"persons": ["alice", "bob", "carol"],
         "privacy_budget": {"epsilon": 8.0, "delta": 1e-6, "max_epsilon_per_query": 1.0}}]})

    application_reference: Reference | None = None
    amendment_of: Reference | None = None
    title: ShortText | None = None
    decision: Literal["granted", "partially_granted"] | None = None
    not_granted: Text | None = None
    holder: HealthDataUser | None = None
    purposes: list[Purpose] | None = Field(None, min_length=1, max_length=len(Purpose))
    purpose_justification: Text | None = None
    datasets: list[DatasetGrantIn] | None = Field(None, min_length=1, max_length=32)
    access_mode: AccessMode | None = None
    pseudonymisation_justification: Text | None = None
    spe_tools: list[str] | None = Field(None, max_length=32)
    persons: list[Username] | None = Field(None, min_length=1, max_length=200)
    retention_days: int | None = Field(None, ge=0, le=MAX_RETENTION_DAYS)
    conditions: list[Text] | None = Field(None, max_length=50)
    privacy_budget: PrivacyBudgetIn | None = None
    export_policy: ExportPolicyIn | None = None
    compute_quota: ComputeQuotaIn | None = None

    def changes(self) -> dict[str, Any]:
        """The fields the caller set (JSON-ready), excluding explicit nulls."""
        return {k: v for k, v in self.model_dump(mode="json", exclude_unset=True).items()
                if v is not None}


class ReasonRequest(_Strict):
    """Body of suspend / resume / revoke: why (recorded in the history and the audit log)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"reason": "Suspected misuse reported on 2026-03-01; under investigation."}]})

    reason: Text


class ExtendRequest(_Strict):
    """Body of ``POST /v1/permits/{id}/extend``: the new end of the access period."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"valid_until": "2030-01-01T00:00:00Z",
                      "reason": "Follow-up of the cohort approved by the access body."}]})

    valid_until: IsoDateTime
    reason: Text


class PermitPublic(PermitContent):
    """A permit as returned by the API: its newest version and its effective status."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {**_EXAMPLE_CONTENT, "id": "3f0c7f6e-3c5b-4c43-9d59-2b1f1cf0a3d2",
         "access_body": "hdab-alpha", "status": "active", "version": 1,
         "etag": '"3f0c7f6e-v1-5d41402abc4b2a76"', "extended": False,
         "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"}]})

    id: str
    access_body: str
    status: PermitStatus = Field(description="Effective status: expired as soon as "
                                 "valid_until has passed; pending before valid_from.")
    version: int
    etag: str = Field(description="Send it back in If-Match to amend this version.")
    extended: bool = Field(description="Whether the one allowed extension has been used.")
    created_at: datetime
    updated_at: datetime


class PermitPage(BaseModel):
    """One page of permits; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[PermitPublic]
    next_cursor: str | None = None


class PermitVersionPublic(BaseModel):
    """One version of a permit: the full snapshot, who made it, when, and what changed."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"version": 2, "change": "amended", "changed_fields": ["persons"], "actor": "hdab-alpha",
         "time": "2026-02-01T09:00:00Z", "reason": None, "status": "active",
         "content": _EXAMPLE_CONTENT}]})

    version: int
    change: str = Field(description="issued, amended, suspended, resumed, revoked, expired or "
                        "extended")
    changed_fields: list[str]
    actor: str
    time: datetime
    reason: str | None
    status: PermitStatus = Field(description="Recorded status after this change.")
    content: PermitContent


class PermitVersionList(BaseModel):
    items: list[PermitVersionPublic]


class PermitEventPublic(BaseModel):
    """One entry of the permit event stream (an outbox row)."""

    id: int = Field(description="Monotonically increasing; poll with after=<last id seen>.")
    permit_id: str
    kind: str
    version: int
    status: PermitStatus
    time: datetime


class PermitEventPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [
        {"id": 7, "permit_id": "3f0c7f6e-3c5b-4c43-9d59-2b1f1cf0a3d2", "kind": "suspended",
         "version": 3, "status": "suspended", "time": "2026-03-01T10:00:00Z"}], "last_id": 7}]})

    items: list[PermitEventPublic]
    last_id: int = Field(description="Pass as after= to continue.")
