"""Compose the SPE API from the packages' routers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

import spe
from spe.api import docs, problems
from spe.api.middleware import RequestContextMiddleware, StreamedRoute
from spe.api.routers import health
from spe.api.state import AppState
from spe.config import Settings, get_settings
from spe.db import Database


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    db = db or Database(settings.resolved_database_url)
    app = FastAPI(
        title="Secure Processing Environment API",
        version=spe.__version__,
        description="API of the SPE: permits for access bodies, DP queries for researchers, "
        "datasets, exports and audit for hospital admins. Errors are RFC 9457 problem details.",
        docs_url=None, redoc_url=None,
    )
    app.state.spe = AppState(settings=settings, db=db)
    problems.install(app)
    docs.install(app)

    app.add_middleware(RequestContextMiddleware, max_body=settings.max_request_bytes,
                       streamed=_streamed_routes(settings))

    app.include_router(health.router)
    for router in _package_routers():
        app.include_router(router)
    _document(app)
    return app


def _document(app: FastAPI) -> None:
    """The OpenAPI document, built once: every problem response is application/problem+json
    with the shared Problem schema (descriptions generated from the error classes)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problems.document_problems(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _streamed_routes(settings: Settings) -> list[StreamedRoute]:
    """Routes that take large bodies as a stream, each with its own limit."""
    from spe.airlock import api as airlock_api

    return [StreamedRoute("POST", airlock_api.UPLOAD_PATH, settings.airlock_max_file_bytes)]


def _package_routers() -> list:  # type: ignore[type-arg]
    """Routers of the packages; each package adds its own import here."""
    from permits import api as permits_api
    from spe.airlock import api as airlock_api
    from spe.api.routers import audit, datasets
    from spe.auth import api as auth_api
    from spe.dp import api as dp_api
    from spe.web import views as web_views
    from workspaces import api as workspaces_api

    return [datasets.router, auth_api.router, permits_api.router, dp_api.router,
            workspaces_api.router, audit.router, airlock_api.router,
            web_views.router]
