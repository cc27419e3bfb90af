"""The API explorer (``/docs``, Swagger UI) and reference (``/redoc``), served with their own
assets: nothing is loaded from a CDN, so the pages work on a machine without internet.

The JavaScript and CSS come from the ``fastapi-offline`` package (MIT; Swagger UI 5 and
ReDoc), installed with the SPE from the hashed lock; they are served from
``/docs/assets/<name>`` (an allow-list of file names, nothing else under that path).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from spe.errors import NotFound

ASSET_PREFIX = "/docs/assets"
#: name -> media type of every file served under ASSET_PREFIX.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
}


def asset_dir() -> Path:
    """Where the packaged assets are (a directory of the installed ``fastapi_offline``)."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def install(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets to an app built with ``docs_url=None`` and
    ``redoc_url=None``."""
    folder = asset_dir()
    title = app.title

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{title} - explorer",
            swagger_js_url=f"{ASSET_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSET_PREFIX}/swagger-ui.css", swagger_favicon_url="")

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{title} - reference",
            redoc_js_url=f"{ASSET_PREFIX}/redoc.standalone.js", redoc_favicon_url="",
            with_google_fonts=False)

    @app.get(ASSET_PREFIX + "/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        media = ASSETS.get(name)
        if media is None:
            raise NotFound("No such documentation asset.")
        return FileResponse(folder / name, media_type=media)
