"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spe.errors import SPEError

PROBLEM_TYPE_BASE = "https://spe.example/problems/"
logger = logging.getLogger("spe.api")


def problem(status: int, code: str, title: str, detail: str, request: Request,
            errors: list[dict[str, Any]] | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        body["request_id"] = request_id
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type="application/problem+json",
                        headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        # Never echo the offending input back: it may hold data or a token.
        out.append({"loc": [str(p) for p in err.get("loc", ())], "msg": err.get("msg", ""),
                    "type": err.get("type", "")})
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(SPEError)
    async def _spe_error(request: Request, exc: SPEError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="spe"'} if exc.status == 401 else None
        return problem(exc.status, exc.code, exc.title, exc.detail, request, exc.errors, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, "invalid-input", "Invalid input",
                       "The request does not match the schema; see errors.", request,
                       _validation_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return problem(exc.status_code, f"http-{exc.status_code}", detail, detail, request,
                       headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc,
                     extra={"fields": {"path": request.url.path}})
        return problem(500, "internal-error", "Internal error",
                       "The SPE could not complete the request.", request)
