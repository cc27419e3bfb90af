"""Every action the SPE records in its audit log, with what it means.

Contract
--------
* An :class:`~spe.audit.events.AuditEvent` accepts only these actions (its ``action`` field is
  an ``AuditAction``); a new kind of act adds a member here first, with its meaning, so the
  list below is the complete vocabulary of the log.
* The value (``domain.verb``) is what is stored and chained; the member name is what the
  export shows next to it (``spe audit export``: ``action_name``), and ``spe audit actions``
  prints the table.
* API routes built on :class:`spe.api.routing.AuditedRoute` use the action as the route's
  ``name``: refusals of the route are recorded under it (outcome ``refused``).
"""

from __future__ import annotations

from enum import StrEnum


class AuditAction(StrEnum):
    """``domain.verb`` of an audited act. Each member's meaning is in :data:`MEANINGS`."""

    # API edge
    API_REQUEST = "api.request"
    # identity
    AUTH_ME = "auth.me"
    AUTH_WORKSPACE_TOKEN_MINT = "auth.workspace_token_mint"  # noqa: S105 (a name, no secret)
    AUTH_WORKSPACE_TOKENS_REVOKE = "auth.workspace_tokens_revoke"
    AUTH_PERMIT_TOKENS_REVOKE = "auth.permit_tokens_revoke"
    AUTH_PERSON_TOKENS_REVOKE = "auth.person_tokens_revoke"
    AUTH_KEY_ROTATE = "auth.key_rotate"
    # datasets
    DATASET_LIST = "dataset.list"
    DATASET_READ = "dataset.read"
    DATASET_INGEST = "dataset.ingest"
    DATASET_RECOVER = "dataset.recover"
    DATASET_REMOVE = "dataset.remove"
    # permits
    PERMIT_ISSUE = "permit.issue"
    PERMIT_LIST = "permit.list"
    PERMIT_READ = "permit.read"
    PERMIT_AMEND = "permit.amend"
    PERMIT_VERSIONS = "permit.versions"
    PERMIT_SUSPEND = "permit.suspend"
    PERMIT_RESUME = "permit.resume"
    PERMIT_REVOKE = "permit.revoke"
    PERMIT_EXTEND = "permit.extend"
    PERMIT_EXPIRE = "permit.expire"
    PERMIT_EVENTS = "permit.events"
    # DP queries and budget
    DP_QUERY = "dp.query"
    DP_QUERY_DRY_RUN = "dp.query.dry_run"
    DP_QUERY_REPLAY = "dp.query.replay"
    DP_QUERY_RESERVE = "dp.query.reserve"
    DP_BUDGET = "dp.budget"
    # workspaces and the hub
    HUB_LOGIN = "hub.login"
    HUB_LOGOUT = "hub.logout"
    WORKSPACE_LIST = "workspace.list"
    WORKSPACE_GPUS = "workspace.gpus"
    WORKSPACE_SPAWN = "workspace.spawn"
    WORKSPACE_STOP = "workspace.stop"
    WORKSPACE_CULL = "workspace.cull"
    WORKSPACE_RECONCILE = "workspace.reconcile"
    WORKSPACE_PERMIT_AMENDED = "workspace.permit_amended"
    WORKSPACE_GPU_ALLOCATE = "workspace.gpu_allocate"
    WORKSPACE_GPU_RELEASE = "workspace.gpu_release"
    WORKSPACE_EXTRACT_BUILD = "workspace.extract_build"
    WORKSPACE_EXTRACT_REMOVE = "workspace.extract_remove"
    WORKSPACE_DATA_DELETE_SCHEDULE = "workspace.data_delete_schedule"
    WORKSPACE_DATA_DELETE = "workspace.data_delete"
    WORKSPACE_BROWSER_BLOCKED = "workspace.browser_blocked"
    WORKSPACE_BROWSER_EGRESS = "workspace.browser_egress"
    WORKSPACE_BROWSER_BUDGET_EXCEEDED = "workspace.browser_budget_exceeded"
    WORKSPACE_BROWSER_UPLOAD = "workspace.browser_upload"
    WORKSPACE_PAUSE = "workspace.pause"
    WORKSPACE_NETWORK_REINSTALL = "workspace.network_reinstall"
    # the airlock (exports)
    AIRLOCK_CREATE = "airlock.create"
    AIRLOCK_LIST = "airlock.list"
    AIRLOCK_READ = "airlock.read"
    AIRLOCK_UPLOAD = "airlock.upload"
    AIRLOCK_REMOVE_FILE = "airlock.remove_file"
    AIRLOCK_SUBMIT = "airlock.submit"
    AIRLOCK_CHECK = "airlock.check"
    AIRLOCK_TRANSITION = "airlock.transition"
    AIRLOCK_WITHDRAW = "airlock.withdraw"
    AIRLOCK_REVISE = "airlock.revise"
    AIRLOCK_VOTE = "airlock.vote"
    AIRLOCK_RELEASE = "airlock.release"
    AIRLOCK_CLOSE = "airlock.close"
    AIRLOCK_DOWNLOAD = "airlock.download"
    AIRLOCK_PURGE = "airlock.purge"
    AIRLOCK_MIA = "airlock.mia"
    # the audit log itself
    AUDIT_READ = "audit.read"
    AUDIT_KEYS = "audit.keys"
    AUDIT_KEY_ROTATE = "audit.key_rotate"
    AUDIT_CHECKPOINT = "audit.checkpoint"
    AUDIT_CHECKPOINTS = "audit.checkpoints"
    AUDIT_CONSISTENCY = "audit.consistency"
    AUDIT_ARCHIVE = "audit.archive"
    AUDIT_PROOF = "audit.proof"
    AUDIT_ALERT = "audit.alert"
    # the incident switch
    INCIDENT_FREEZE = "incident.freeze"
    INCIDENT_THAW = "incident.thaw"
    INCIDENT_EVIDENCE = "incident.evidence"
    # the audit log's own tooling (tests and operators' checks)
    AUDIT_TEST = "audit.test"
    # the web console
    WEB_LOGIN = "web.login"
    WEB_LOGOUT = "web.logout"
    WEB_REFUSED = "web.refused"


MEANINGS: dict[AuditAction, str] = {
    AuditAction.API_REQUEST: "a request refused at the API edge before any route ran "
    "(e.g. a body over the size limit)",
    AuditAction.AUTH_ME: "a caller asked who they are (GET /v1/me)",
    AuditAction.AUTH_WORKSPACE_TOKEN_MINT: "an SPE workspace token was minted for a person, "
    "permit and workspace",
    AuditAction.AUTH_WORKSPACE_TOKENS_REVOKE: "the tokens of one workspace were revoked",
    AuditAction.AUTH_PERMIT_TOKENS_REVOKE: "every workspace token of a permit was revoked "
    "(suspension, revocation, expiry)",
    AuditAction.AUTH_PERSON_TOKENS_REVOKE: "a person's workspace tokens were revoked (removed "
    "from a permit)",
    AuditAction.AUTH_KEY_ROTATE: "the SPE's token signing key was rotated",
    AuditAction.DATASET_LIST: "the dataset registry was listed",
    AuditAction.DATASET_READ: "one dataset's metadata was read",
    AuditAction.DATASET_INGEST: "a dataset was ingested (or its ingest refused)",
    AuditAction.DATASET_RECOVER: "an interrupted ingest was cleaned up",
    AuditAction.DATASET_REMOVE: "a dataset was removed from the registry",
    AuditAction.PERMIT_ISSUE: "an access body issued a permit",
    AuditAction.PERMIT_LIST: "permits were listed",
    AuditAction.PERMIT_READ: "a permit was read",
    AuditAction.PERMIT_AMEND: "a permit was amended (new version)",
    AuditAction.PERMIT_VERSIONS: "a permit's version history was read",
    AuditAction.PERMIT_SUSPEND: "a permit was suspended (access halted)",
    AuditAction.PERMIT_RESUME: "a suspended permit was resumed",
    AuditAction.PERMIT_REVOKE: "a permit was revoked (final, EHDS Art 63)",
    AuditAction.PERMIT_EXTEND: "a permit's validity was extended (once, EHDS Art 68(12))",
    AuditAction.PERMIT_EXPIRE: "the expiry sweeper recorded a permit as expired",
    AuditAction.PERMIT_EVENTS: "the permit event stream was polled",
    AuditAction.DP_QUERY: "a DP query was answered, refused or failed (SQL text and cost)",
    AuditAction.DP_QUERY_DRY_RUN: "a DP query was priced without running (free)",
    AuditAction.DP_QUERY_REPLAY: "an idempotent DP query was answered from its stored result",
    AuditAction.DP_QUERY_RESERVE: "a DP query's privacy cost was reserved in the ledger",
    AuditAction.DP_BUDGET: "a permit's privacy budget was read",
    AuditAction.HUB_LOGIN: "a person logged in to JupyterHub (or was refused)",
    AuditAction.HUB_LOGOUT: "a person logged out of JupyterHub",
    AuditAction.WORKSPACE_LIST: "the workspaces were listed",
    AuditAction.WORKSPACE_GPUS: "the GPU inventory and allocations were read",
    AuditAction.WORKSPACE_SPAWN: "a workspace server was started (or its start refused)",
    AuditAction.WORKSPACE_STOP: "a workspace server was stopped",
    AuditAction.WORKSPACE_CULL: "workspaces of a permit that may no longer run were stopped",
    AuditAction.WORKSPACE_RECONCILE: "what a workspace left after an unclean stop (namespace, "
    "nftables table, veth, cgroup, mount, loop device, record) was cleaned",
    AuditAction.WORKSPACE_PERMIT_AMENDED: "a running workspace saw its permit amended",
    AuditAction.WORKSPACE_GPU_ALLOCATE: "GPUs were allocated to a workspace (or refused)",
    AuditAction.WORKSPACE_GPU_RELEASE: "a workspace's GPUs were released",
    AuditAction.WORKSPACE_EXTRACT_BUILD: "a pseudonymised extract was built for a permit",
    AuditAction.WORKSPACE_EXTRACT_REMOVE: "a permit's extract was removed",
    AuditAction.WORKSPACE_DATA_DELETE_SCHEDULE: "a workspace's data were scheduled for "
    "deletion (retention deadline set)",
    AuditAction.WORKSPACE_DATA_DELETE: "a workspace's data were deleted",
    AuditAction.WORKSPACE_BROWSER_BLOCKED: "the browser gate refused a request to a workspace "
    "(a download route, an unknown host or path, a paused workspace)",
    AuditAction.WORKSPACE_BROWSER_EGRESS: "bytes a workspace sent to browsers so far today "
    "(recorded at every tenth of the budget)",
    AuditAction.WORKSPACE_BROWSER_BUDGET_EXCEEDED: "ALERT: a workspace's responses to browsers "
    "exceeded the daily byte budget; the workspace was paused",
    AuditAction.WORKSPACE_BROWSER_UPLOAD: "a file or notebook was written into a workspace "
    "through the browser (or refused over the upload limit)",
    AuditAction.WORKSPACE_PAUSE: "a workspace's server was paused (frozen or stopped) by a control",
    AuditAction.AIRLOCK_CREATE: "a researcher opened an export request (draft)",
    AuditAction.AIRLOCK_LIST: "a permit's export requests were listed",
    AuditAction.AIRLOCK_READ: "one export request was read",
    AuditAction.AIRLOCK_UPLOAD: "a file's bytes entered quarantine (SHA-256 and size recorded)",
    AuditAction.AIRLOCK_REMOVE_FILE: "a file was removed from a draft export request",
    AuditAction.AIRLOCK_SUBMIT: "an export request was submitted (its files frozen)",
    AuditAction.AIRLOCK_CHECK: "the automated checks of one exported file ran (outcomes recorded)",
    AuditAction.AIRLOCK_TRANSITION: "an export request changed state (from, to, why)",
    AuditAction.AIRLOCK_WITHDRAW: "a researcher withdrew an export request",
    AuditAction.AIRLOCK_REVISE: "a returned export request went back to draft for changes",
    AuditAction.AIRLOCK_VOTE: "a reviewer voted on an export request",
    AuditAction.AIRLOCK_RELEASE: "an exported file was released into the permit's ledger",
    AuditAction.AIRLOCK_CLOSE: "open export requests were rejected because their permit ended "
    "or was suspended",
    AuditAction.AIRLOCK_DOWNLOAD: "a released file was downloaded (or the download refused)",
    AuditAction.AIRLOCK_MIA: "the membership-inference job of an exported model finished "
    "(outcome recorded on the file)",
    AuditAction.AIRLOCK_PURGE: "quarantined bytes of a rejected, withdrawn or closed export "
    "request (or its unreleased files) were deleted after the retention period; the records "
    "and hashes stay",
    AuditAction.AUDIT_READ: "audit entries were read through the API (the filters are "
    "recorded, not the entries)",
    AuditAction.AUDIT_KEYS: "the public checkpoint keys were listed",
    AuditAction.AUDIT_KEY_ROTATE: "the checkpoint signing key was rotated",
    AuditAction.AUDIT_CHECKPOINT: "a signed checkpoint of the audit log was made (or refused: "
    "the log no longer extends the last one)",
    AuditAction.AUDIT_CHECKPOINTS: "signed checkpoints of the audit log were fetched",
    AuditAction.AUDIT_CONSISTENCY: "a consistency proof between two checkpoints was fetched",
    AuditAction.AUDIT_ARCHIVE: "entries older than the retention period were written to a "
    "signed archive file and removed from the database (range, count, file)",
    AuditAction.AUDIT_PROOF: "a permit's audit entries were fetched with inclusion proofs",
    AuditAction.AUDIT_ALERT: "ALERT: a rule flagged a suspicious pattern in the audit log "
    "(spe.audit.alerts: the rule, counts and entry numbers in details)",
    AuditAction.INCIDENT_FREEZE: "INCIDENT: a permit (or every permit) was frozen: its "
    "workspace tokens are refused, nothing is deleted",
    AuditAction.INCIDENT_THAW: "a freeze was lifted (with its recorded reason)",
    AuditAction.INCIDENT_EVIDENCE: "a signed evidence bundle was made for an access body",
    AuditAction.AUDIT_TEST: "a test or operator check wrote an entry to exercise the log",
    AuditAction.WEB_LOGIN: "a person logged in to the web console through Keycloak (or was "
    "refused)",
    AuditAction.WEB_LOGOUT: "a person logged out of the web console (and of Keycloak)",
    AuditAction.WEB_REFUSED: "the web console refused a request (a form without its CSRF "
    "token, a page the person may not open)",
    AuditAction.WORKSPACE_NETWORK_REINSTALL: "a workspace network's host firewall table was "
    "found missing and re-installed (an alert)",
}

assert set(MEANINGS) == set(AuditAction), "every audit action needs its meaning"


def action_name(value: str) -> str | None:
    """The enum name of a stored action value (None for a value no longer in the enum)."""
    try:
        return AuditAction(value).name
    except ValueError:
        return None
