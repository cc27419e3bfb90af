"""Where the act comes from: the client address and workspace of the request being served.

Contract: the API's outermost middleware calls :func:`begin` for each HTTP request (the client
address as the server sees it) and :func:`end` after it; authentication adds the workspace of
a workspace token with :func:`note_workspace`. ``spe.audit.writer.record`` adds both to the
details of every entry written while the request is served (``client_address``,
``workspace``), unless the event names them itself. Outside a request nothing is added. The
values are identifiers only (an address, a workspace id), never tokens or data.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Any

_CURRENT: ContextVar[dict[str, Any] | None] = ContextVar("spe_audit_request", default=None)


def begin(client_address: str | None) -> Token[dict[str, Any] | None]:
    return _CURRENT.set({"client_address": client_address} if client_address else {})


def end(token: Token[dict[str, Any] | None]) -> None:
    _CURRENT.reset(token)


def note_workspace(workspace_id: str | None) -> None:
    found = _CURRENT.get()
    if found is not None and workspace_id:
        found["workspace"] = workspace_id


def current() -> dict[str, Any] | None:
    """The fields of the request being served (a copy), or None outside a request."""
    found = _CURRENT.get()
    return dict(found) if found else None
