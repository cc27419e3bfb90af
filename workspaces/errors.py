"""Exceptions of the enclave (one line each; all map to RFC 9457 problems via spe.errors)."""

from permits.errors import NotNamedInPermit, PermitNotUsable
from spe.errors import Conflict, ServiceUnavailable

__all__ = ["DiskAdmissionRefused", "GpuUnavailable", "NotNamedInPermit", "PermitNotUsable",
           "StaleRuntime", "UnsupportedArchitecture", "WorkspaceStartFailed"]


class GpuUnavailable(Conflict):
    code, title = "gpu-unavailable", "Not enough free GPUs"


class WorkspaceStartFailed(ServiceUnavailable):
    code, title = "workspace-start-failed", "Workspace failed to start"


class UnsupportedArchitecture(WorkspaceStartFailed):
    code, title = "unsupported-architecture", "No sandbox system call filter for this machine"


class StaleRuntime(WorkspaceStartFailed):
    code, title = "stale-runtime", "The workspace runtime must be rebuilt"


class DiskAdmissionRefused(WorkspaceStartFailed):
    code, title = "disk-admission-refused", "Not enough free disk for the workspace"
