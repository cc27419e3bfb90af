"""One settings object for the whole SPE.

Values come, highest priority first, from keyword arguments, environment variables
(``SPE_`` prefix, e.g. ``SPE_DATABASE_URL``) and an optional TOML file (``spe.toml`` in the
working directory, or the path in ``SPE_CONFIG``). Every option states whether and how it is
enforced. Outside the ``dev`` profile, default secrets are refused at load time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEV_SECRET = "dev-only-insecure-secret-change-me"  # noqa: S105 - refused outside dev
DEV_CONSOLE_CLIENT_SECRET = "spe-console-dev-secret"  # noqa: S105 - refused outside dev
DEV_KEYCLOAK_ADMIN_PASSWORD = "admin"  # noqa: S105 - refused outside dev

Profile = Literal["dev", "test", "prod"]
SECRET_FILE_FIELDS = ("secret_key", "console_client_secret", "keycloak_admin_password")


def _config_file() -> Path:
    return Path(os.environ.get("SPE_CONFIG", "spe.toml"))


def read_secret_file(path: Path, what: str) -> str:
    """The stripped content of the secret file ``path``; refused (ValueError naming ``what``)
    when group or others may access it, when it is not a regular file, or when it is empty."""
    from spe.tls import private_key_problem

    if (why := private_key_problem(path)) is not None:
        raise ValueError(f"{what} refused: {why}")
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{what} is empty")
    return value


def secret_from_env(name: str, environ: Mapping[str, str] = os.environ) -> str:
    """``environ[name]``, or the secret read from the file named by ``<name>_FILE`` (which wins;
    see :func:`read_secret_file`); empty when neither is set."""
    path = environ.get(f"{name}_FILE")
    if path:
        return read_secret_file(Path(path), f"{name}_FILE")
    return environ.get(name, "")


class Settings(BaseSettings):
    """Settings of one SPE installation."""

    model_config = SettingsConfigDict(
        env_prefix="SPE_", extra="forbid", validate_default=True, frozen=True
    )

    profile: Profile = Field(
        "dev",
        description="Deployment profile. Enforced: outside 'dev', default secrets and "
        "an unset secret_key make loading fail.",
    )
    data_dir: Path = Field(
        Path("var"),
        description="Directory for everything the SPE stores (control database, dataset "
        "store, keys, workspaces). Created on first use; the dataset store inside it is "
        "created with mode 0700.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the control-plane database. Default: a SQLite file "
        "`control.db` in data_dir. PostgreSQL: postgresql+psycopg://user:pw@host:port/db.",
    )
    secret_key: SecretStr = Field(
        SecretStr(DEV_SECRET),
        description="Server secret used to sign release receipts and workspace tokens. "
        "Enforced: refused outside the dev profile while it is the default or shorter "
        "than 32 characters.",
    )
    api_host: str = Field("127.0.0.1", description="Address the SPE API listens on.")
    api_port: int = Field(8600, ge=1, le=65535, description="Port of the SPE API.")
    public_url: str | None = Field(
        None, description="URL under which the API is reached; default http://api_host:api_port."
    )
    keycloak_url: str | None = Field(
        None,
        description="Base URL of an external Keycloak (e.g. https://id.example.org). "
        "Unset: `spe up` starts the bundled Keycloak from infra/keycloak on keycloak_port.",
    )
    keycloak_port: int = Field(
        8180, ge=1, le=65535, description="Port of the bundled Keycloak started by `spe up`."
    )
    keycloak_realm: str = Field("spe", description="Keycloak realm holding the SPE's users.")
    keycloak_admin_user: str = Field("admin", description="Keycloak admin user for provisioning.")
    keycloak_admin_password: SecretStr = Field(
        SecretStr(DEV_KEYCLOAK_ADMIN_PASSWORD),
        description="Password of keycloak_admin_user. Enforced: the default is refused "
        "outside the dev profile.",
    )
    api_audience: str = Field(
        "spe-api", description="Audience the API requires in every bearer token (enforced)."
    )
    token_leeway_seconds: int = Field(
        30, ge=0, le=120, description="Clock skew allowed on exp/nbf checks (enforced)."
    )
    workspace_token_ttl_seconds: int = Field(
        900, ge=60, le=86400, description="Lifetime of workspace tokens (enforced at validation)."
    )
    duckdb_memory_limit: str = Field(
        "2GB", description="Memory limit of each DuckDB query connection (enforced by DuckDB)."
    )
    duckdb_threads: int = Field(
        2, ge=1, le=256, description="Threads per DuckDB query connection (enforced by DuckDB)."
    )
    query_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="Wall-clock limit of one DP query (enforced: interrupted)."
    )
    dp_answer_time_bucket_seconds: float = Field(
        0.25, ge=0, le=60,
        description="DP answers (and failures after data access) are returned at the next "
        "multiple of this many seconds after the request reached the engine, so the answer "
        "time tells nothing finer about the data. Enforced by the DP service; 0 turns "
        "padding off (benchmarks only).",
    )
    dp_min_epsilon_per_query: float = Field(
        0.01, gt=0, le=100,
        description="Smallest epsilon a DP query may spend, so no probe is free. Enforced: "
        "queries asking for less (or whose permit's per-query maximum is below it) are "
        "refused before planning.",
    )
    dp_permit_queries_per_minute: float = Field(
        60.0, gt=0,
        description="Queries (not dry runs) one permit may run per minute, all its "
        "researchers together (token bucket). Enforced by the DP service: further queries "
        "are refused (429) and audited.",
    )
    dp_permit_query_burst: int = Field(
        20, ge=1, description="Burst size of dp_permit_queries_per_minute (enforced)."
    )
    dp_max_threshold_groups: int = Field(
        100_000, ge=1,
        description="Most groups a thresholded DP query (non-public keys) fetches from the "
        "store. Enforced: the fetch stops at this bound and the query fails generically "
        "(charged).",
    )
    api_token_requests_per_minute: float = Field(
        120.0, gt=0,
        description="DP requests (queries, dry runs, budget reads) one token may make per "
        "minute (token bucket). Enforced by the DP API: further requests get 429, audited.",
    )
    api_token_burst: int = Field(
        30, ge=1, description="Burst size of api_token_requests_per_minute (enforced)."
    )
    api_token_concurrency: int = Field(
        4, ge=1,
        description="DP requests one token may have in flight at once. Enforced by the DP "
        "API: more are refused (429), audited.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the structured JSON logs."
    )
    max_request_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="Largest request body the API accepts (enforced before parsing).",
    )
    airlock_permit_writes_per_minute: float = Field(
        120.0, gt=0,
        description="Export writes (drafts opened, files uploaded, submissions) one permit may "
        "make per minute, all its researchers together (token bucket). Enforced by the airlock "
        "API: further writes get 429 with Retry-After, audited as refusals.",
    )
    airlock_permit_write_burst: int = Field(
        60, ge=1, description="Burst size of airlock_permit_writes_per_minute (enforced)."
    )
    airlock_token_writes_per_minute: float = Field(
        60.0, gt=0,
        description="Export writes one token (or user) may make per minute (token bucket). "
        "Enforced by the airlock API: 429 with Retry-After, audited.",
    )
    airlock_token_write_burst: int = Field(
        30, ge=1, description="Burst size of airlock_token_writes_per_minute (enforced)."
    )
    airlock_token_concurrent_uploads: int = Field(
        2, ge=1,
        description="Uploads one token may stream at once. Enforced by the airlock API: more "
        "are refused (429) before the first byte is read.",
    )
    airlock_max_files: int = Field(
        20, ge=1, le=1000,
        description="Most files one export request may carry, unless the permit's export "
        "policy sets max_files. Enforced: a further upload is refused (409).",
    )
    airlock_max_bytes: int = Field(
        256_000_000, ge=1024,
        description="Most bytes the files of one export request may hold together, unless the "
        "permit's export policy sets max_bytes. Enforced at upload (413, audited), while the "
        "file streams in.",
    )
    airlock_max_file_bytes: int = Field(
        128_000_000, ge=1024,
        description="Most bytes one exported file may hold (a 100 MB CSV fits). Enforced on the "
        "upload route, which alone is exempt from max_request_bytes: a larger declared "
        "Content-Length is refused at once, a chunked body is cut at the limit (413, "
        "audited); the file streams to quarantine, never held in memory.",
    )
    airlock_retention_days: float = Field(
        180.0, ge=0, le=3650,
        description="Days the quarantined bytes of export files that were not released (the "
        "request rejected, withdrawn or closed with its permit, or the file refused by the "
        "reviewers) are kept after the request's last change. Enforced: the API's purge "
        "(every airlock_purge_interval_seconds) deletes them, audited as airlock.purge; the "
        "requests, files' hashes and sizes and the audit entries stay; released files are "
        "kept for the ledger (differencing reads them).",
    )
    airlock_draft_days: float = Field(
        30.0, gt=0,
        description="Days a draft export request may stay unchanged under an active permit. "
        "Enforced by the purge task: older drafts are withdrawn (audited, with a reason the "
        "researcher sees) and then fall under airlock_retention_days.",
    )
    airlock_purge_interval_seconds: float = Field(
        3600.0, ge=0, le=86400,
        description="How often the API deletes quarantined files past airlock_retention_days. "
        "Enforced by a background task of the API; 0 turns it off.",
    )
    airlock_max_rows: int = Field(
        5000, ge=1,
        description="Most rows a table in an export may have, unless the permit's export policy "
        "sets max_rows. Enforced by the airlock's checks: more is a blocking failure.",
    )
    airlock_sacroml_python: Path | None = Field(
        None,
        description="Python interpreter of a separate virtual environment with SACRO-ML (and "
        "PyTorch/XGBoost) installed. When set, the airlock runs SACRO-ML's membership-inference "
        "attack on exported models as a background job in that environment and shows the "
        "result to reviewers; unset, model files say 'MIA not run' and go to human review.",
    )
    airlock_mia_timeout_seconds: float = Field(
        1800.0, gt=0, le=86400,
        description="Wall-clock limit of one membership-inference job; past it the job is "
        "killed and its file marked for reviewers.",
    )
    audit_checkpoint_interval_seconds: float = Field(
        300.0, ge=0, le=86400,
        description="How often the API signs a checkpoint of the audit log (Merkle root, "
        "entry count, chain head; Ed25519 key in data_dir/audit/keys), appended to "
        "data_dir/audit/checkpoints.jsonl and served to access bodies. Enforced by a "
        "background thread of the API when the log has grown; 0 turns the schedule off "
        "(checkpoints then only on demand: POST /v1/audit/checkpoints, `spe audit checkpoint`).",
    )
    audit_retention_days: int = Field(
        365, description="Audit entries older than this many days may be moved by "
        "`spe audit archive` (spe.audit.archive.archive_expired) into a signed JSON Lines file "
        "under data_dir/audit/archive; verification still covers them. Enforced: values below "
        "365 (EHDS: logs kept at least a year) are refused at load.",
    )
    audit_alert_interval_seconds: float = Field(
        60.0, ge=0, le=86400,
        description="How often the API scans new audit entries with the alert rules "
        "(spe.audit.alerts); alerts are recorded as audit.alert entries. Enforced by a "
        "background thread of the API; 0 turns it off (`spe audit alerts --scan` by hand).",
    )
    audit_alert_refusals: int = Field(
        10, ge=1, description="Refusals of one actor within audit_alert_window_seconds that "
        "raise a many_refusals alert (enforced by the alert scan).")
    audit_alert_repeats: int = Field(
        20, ge=2, description="Identical queries (same SQL hash) of one actor within the window "
        "that raise a repeated_queries alert (enforced by the alert scan).")
    audit_alert_window_seconds: float = Field(
        600.0, gt=0, le=86400, description="Window of the counting alert rules (seconds).")
    audit_alert_webhook_url: str | None = Field(
        None, description="http(s) URL that receives alerts as a JSON POST. Unset: none sent.")
    audit_alert_syslog: str | None = Field(
        None, description="Syslog destination of alerts: a socket path (/dev/log) or "
        "udp://host:port. Unset: none sent.")

    console_client_id: str = Field(
        "spe-console",
        description="Keycloak client of the web console (authorisation code flow with PKCE; "
        "confidential). Enforced: the console logs in only through this client.",
    )
    console_client_secret: SecretStr = Field(
        SecretStr(DEV_CONSOLE_CLIENT_SECRET),
        description="Secret of console_client_id. Enforced: outside the dev profile the "
        "console refuses to log anyone in while it is the default.",
    )
    console_session_seconds: int = Field(
        28800, ge=300, le=86400,
        description="Lifetime of a console session (server-side row; the cookie carries only "
        "a random id). Enforced: an older session is refused and deleted.",
    )

    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate (with its chain) of the API and console listener. Set with "
        "tls_key_file: `spe up` serves HTTPS with it and api_base_url is https://. `spe up "
        "--tls` makes a local development CA and fills the three tls_* files.",
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key of tls_cert_file. Enforced: refused at load when "
        "group or others may read it.",
    )
    tls_ca_file: Path | None = Field(
        None,
        description="CA bundle the SPE's own clients (workspace client, hub to API, API to "
        "Keycloak) trust. Unset: the system's bundle.",
    )
    secret_key_file: Path | None = Field(
        None, description="File holding secret_key (read at load; replaces secret_key). "
        "Enforced: refused when group or others may access it.",
    )
    console_client_secret_file: Path | None = Field(
        None, description="File holding console_client_secret (same rules as secret_key_file).",
    )
    keycloak_admin_password_file: Path | None = Field(
        None,
        description="File holding keycloak_admin_password (same rules as secret_key_file).",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """Each ``<secret>_file`` replaces ``<secret>`` with the file's stripped content."""
        if not isinstance(data, dict):
            return data
        from spe.tls import private_key_problem

        for name in SECRET_FILE_FIELDS:
            path = data.get(f"{name}_file")
            if path is not None:
                data = {**data, name: read_secret_file(Path(path), f"{name}_file")}
        key = data.get("tls_key_file")
        if key is not None and (why := private_key_problem(Path(key))) is not None:
            raise ValueError(f"tls_key_file refused: {why}")
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("audit_retention_days")
    @classmethod
    def _check_retention(cls, value: int) -> int:
        if value < 365:
            raise ValueError("audit_retention_days must be at least 365: audit logs are kept "
                             "at least one year")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:// and postgresql:// URLs are supported")
        return value

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.profile == "dev":
            return self
        problems = []
        secret = self.secret_key.get_secret_value()
        if secret == DEV_SECRET or len(secret) < 32:
            problems.append("secret_key must be set to a random value of at least 32 characters")
        if self.keycloak_admin_password.get_secret_value() == DEV_KEYCLOAK_ADMIN_PASSWORD:
            problems.append("keycloak_admin_password must not be the default")
        if problems:
            raise ValueError(
                f"profile {self.profile!r} refuses default secrets: " + "; ".join(problems)
            )
        return self

    # Derived locations -------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'control.db').resolve()}"

    @property
    def store_dir(self) -> Path:
        """Dataset store: DuckDB files owned by the service, never mounted in a workspace."""
        return self.data_dir / "store"

    @property
    def keycloak_base_url(self) -> str:
        return self.keycloak_url or f"http://127.0.0.1:{self.keycloak_port}"

    @property
    def api_base_url(self) -> str:
        scheme = "https" if self.tls_cert_file is not None else "http"
        return self.public_url or f"{scheme}://{self.api_host}:{self.api_port}"

    def describe(self) -> list[dict[str, Any]]:
        """Every option with its current value (secrets masked) and its documentation."""
        rows = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********"
            rows.append({"name": name, "value": value, "help": field.description})
        return rows


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()
