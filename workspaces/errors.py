"""Exceptions of the enclave (one line each; all map to RFC 9457 problems via spe.errors)."""

from spe.errors import Conflict, Forbidden, ServiceUnavailable


class GpuUnavailable(Conflict):
    code, title = "gpu-unavailable", "Not enough free GPUs"


class PermitNotUsable(Forbidden):
    code, title = "permit-not-usable", "Permit not active"


class NotNamedInPermit(Forbidden):
    code, title = "not-named-in-permit", "Not a person named in the permit"


class WorkspaceStartFailed(ServiceUnavailable):
    code, title = "workspace-start-failed", "Workspace failed to start"


class UnsupportedArchitecture(WorkspaceStartFailed):
    code, title = "unsupported-architecture", "No sandbox system call filter for this machine"


class StaleRuntime(WorkspaceStartFailed):
    code, title = "stale-runtime", "The workspace runtime must be rebuilt"


class DiskAdmissionRefused(WorkspaceStartFailed):
    code, title = "disk-admission-refused", "Not enough free disk for the workspace"
