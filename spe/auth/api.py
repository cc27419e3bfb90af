"""HTTP routes of the identity package.

``GET /v1/me``: the authenticated caller as the API sees it (any valid token; 401 otherwise).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from spe.api.routing import AuditedRoute
from spe.auth.deps import get_principal
from spe.auth.principal import Principal

router = APIRouter(tags=["identity"], route_class=AuditedRoute)


class MePublic(BaseModel):
    subject: str = Field(description="Keycloak subject (user or service-account id)")
    username: str = Field(description="login name, or the client id of an access body")
    kind: str = Field(description="user, service or workspace")
    roles: list[str] = Field(description="SPE realm roles the caller holds")
    access_body: str | None = Field(None, description="the access body (service tokens)")
    permit_id: str | None = Field(None, description="the permit (workspace tokens)")
    workspace_id: str | None = Field(None, description="the workspace (workspace tokens)")


@router.get("/v1/me", response_model=MePublic, name="auth.me", operation_id="getMe",
            summary="Who am I",
            description="The caller as the SPE sees them: subject, kind, roles.")
def me(principal: Principal = Depends(get_principal)) -> MePublic:
    return MePublic(
        subject=principal.subject,
        username=principal.username,
        kind=principal.kind,
        roles=sorted(r.value for r in principal.roles),
        access_body=principal.access_body,
        permit_id=principal.permit_id,
        workspace_id=principal.workspace_id,
    )
