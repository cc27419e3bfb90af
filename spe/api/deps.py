"""FastAPI dependencies of the SPE API, in one place: every router takes what it needs from here.

Contract
--------
* ``AppStateDep``, ``DatabaseDep``, ``SettingsDep``: the app's state, database and settings.
* ``CurrentPrincipal``: the authenticated caller (401 without a valid bearer token), resolved
  on the thread pool; ``ReadingPrincipal``: the same on the event loop, for short read
  endpoints (token check plus one indexed query: skipping the thread hops roughly doubles
  read throughput). Such an endpoint's one query goes through ``Database.read_one``: about
  25 us of CPU on SQLite and one round trip on PostgreSQL (about 40 us wall on loopback),
  less than a hop to the thread pool and back costs; an async PostgreSQL driver on the loop
  was measured at about 5 % less server CPU per read, within the benchmark's noise, and not
  adopted. ``require_role(*roles)`` (from ``spe.auth.deps``) gives 403 to callers
  without any of ``roles``.
* ``PermitId``: the ``{permit_id}`` path parameter with the constraints the server enforces
  (1-64 characters of ``A-Z a-z 0-9 -``), so the OpenAPI document states them.
* ``IsoDateTime``: a timezone-aware ISO 8601 date-time (query or body); numbers (which
  pydantic would read as Unix times) and times without an offset are refused (422), so the
  server accepts exactly what the schema's ``format: date-time`` says.
* Services: ``permit_service(state)`` / ``PermitServiceDep`` and ``permit_sweeper(state)``,
  created once per app in typed :class:`~spe.api.state.AppState` slots (``PERMIT_SERVICE``,
  ``PERMIT_SWEEPER``); a test swaps one in with ``state.put(PERMIT_SERVICE, service)``.

A new router declares its routes with ``APIRouter(route_class=AuditedRoute)`` (see
``spe.api.routing``) and these dependencies; errors are raised as ``spe.errors`` classes and
leave as problems (``spe.api.problems``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from permits.expiry import ExpirySweeper
from permits.groups import KeycloakPermitGroups
from permits.service import PermitService
from spe.api.state import AppState, StateKey, get_db, get_settings_dep, get_state
from spe.auth.deps import get_principal, require_role
from spe.auth.principal import Principal
from spe.config import Settings
from spe.db import Database
from spe.schema_types import IsoDateTime

__all__ = [
    "PERMIT_SERVICE", "PERMIT_SWEEPER", "AppStateDep", "CurrentPrincipal", "DatabaseDep",
    "IsoDateTime", "PermitId", "PermitServiceDep", "ReadingPrincipal", "SettingsDep",
    "current_principal",
    "get_state", "permit_service", "permit_sweeper", "reading_principal", "require_role",
]

AppStateDep = Annotated[AppState, Depends(get_state)]
DatabaseDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def current_principal(request: Request) -> Principal:
    """The authenticated caller (401 when none); runs on the thread pool."""
    return get_principal(request)


async def reading_principal(request: Request) -> Principal:
    """The authenticated caller, resolved on the event loop (for short read endpoints)."""
    return get_principal(request)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
ReadingPrincipal = Annotated[Principal, Depends(reading_principal)]

PERMIT_ID_PATTERN = r"^[A-Za-z0-9-]+$"
PermitId = Annotated[str, Path(min_length=1, max_length=64, pattern=PERMIT_ID_PATTERN,
                               description="The permit's id.",
                               examples=["3f0c7f6e-3c5b-4c43-9d59-2b1f1cf0a3d2"])]


PERMIT_SERVICE: StateKey[PermitService] = StateKey("permits.service")
PERMIT_SWEEPER: StateKey[ExpirySweeper] = StateKey("permits.sweeper")


def permit_service(state: AppState) -> PermitService:
    """The app's permit service (created on first use, with Keycloak groups)."""
    return state.get_or_create(
        PERMIT_SERVICE,
        lambda: PermitService(state.db, groups=KeycloakPermitGroups(state.settings)))


def permit_sweeper(state: AppState) -> ExpirySweeper:
    """The app's permit expiry sweeper (started and stopped by the permits router)."""
    return state.get_or_create(PERMIT_SWEEPER, lambda: ExpirySweeper(permit_service(state)))


def _permit_service_dep(request: Request) -> PermitService:
    return permit_service(get_state(request))


PermitServiceDep = Annotated[PermitService, Depends(_permit_service_dep)]
