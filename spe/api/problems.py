"""RFC 9457 problem details for every error the API returns, and their OpenAPI documentation.

Contract
--------
* Every error leaves the API as ``application/problem+json`` with the shape of
  :class:`Problem`. ``install(app)`` maps :class:`spe.errors.SPEError` (each class: one
  status, one ``code`` slug, one title), schema errors (422), Starlette's HTTP errors (404 for
  an unknown path, 405 with ``Allow`` listing every method the path has) and anything
  unexpected (500, one generic message).
* Messages never echo input: schema errors list only where and what (``loc``, ``msg``,
  ``type``), never the offending value.
* Routers document the problems an operation can give with :func:`problem_responses`; the
  descriptions and examples are generated from the error classes (:func:`problem_catalog`),
  so a new error class shows up in the document without editing it here.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from spe.errors import SPEError

PROBLEM_TYPE_BASE = "https://spe.example/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
logger = logging.getLogger("spe.api")


class ProblemError(BaseModel):
    """One schema error: where (``loc``) and what (``msg``); never the offending value."""

    model_config = ConfigDict(extra="allow")

    loc: list[str] = Field(default_factory=list, description="path to the field")
    msg: str = Field("", description="what is wrong")
    type: str | None = Field(None, description="machine-readable kind of the error")


class Problem(BaseModel):
    """An RFC 9457 problem details object. ``type`` is ``https://spe.example/problems/<code>``
    where ``<code>`` is the error class's stable slug (see each response's description)."""

    type: str = Field(description="URI naming the kind of problem",
                      examples=[PROBLEM_TYPE_BASE + "not-found"])
    title: str = Field(description="short, fixed summary of the kind of problem")
    status: int = Field(ge=400, le=599, description="the HTTP status code")
    detail: str = Field(description="what is wrong and what to do; never echoes input")
    instance: str | None = Field(None, description="the request path")
    request_id: str | None = Field(None, description="the request's id (X-Request-Id)")
    errors: list[ProblemError] | None = Field(None, description="each schema error (422)")


#: Problems that no SPEError class raises but the API itself gives.
_BUILTIN: dict[int, list[tuple[str, str, str]]] = {
    404: [("http-404", "Not Found", "No route at this path.")],
    405: [("http-405", "Method Not Allowed",
           "The path exists but not with this method; `Allow` lists the methods it has.")],
    413: [("payload-too-large", "Payload too large", "The request body exceeds the limit.")],
    422: [("invalid-input", "Invalid input",
           "The request does not match the schema; `errors` lists each field.")],
}

#: What each status means in this API, whatever class raised it.
STATUS_MEANING: dict[int, str] = {
    400: "The request is well-formed but refused (e.g. a query construct the engine does not "
         "accept).",
    401: "No valid bearer token: send `Authorization: Bearer <token>`.",
    403: "The caller's role or state does not allow this (a missing role, an inactive permit, "
         "an exhausted budget).",
    404: "Not found, or not visible to the caller (never 403, so existence is not revealed).",
    405: "Method not allowed on this path; the `Allow` header lists the methods it has.",
    409: "Conflict with the current state (e.g. an illegal transition).",
    412: "`If-Match` is not the current `ETag`.",
    413: "The request body exceeds the size limit.",
    422: "A field is invalid; `errors` lists each one.",
    428: "A precondition header (`If-Match`) is required.",
    429: "Too many requests; retry after the number of seconds in `Retry-After`.",
    500: "The SPE could not complete the request.",
    503: "A service the SPE depends on (e.g. Keycloak) is unreachable; nothing changed.",
}


def _subclasses(cls: type[SPEError]) -> list[type[SPEError]]:
    out: list[type[SPEError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def problem_catalog() -> dict[int, list[tuple[str, str, str]]]:
    """``status -> [(code, title, class name or meaning)]`` from every loaded error class."""
    catalog: dict[int, list[tuple[str, str, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for cls in _subclasses(SPEError):
        key = (cls.status, cls.code)
        if key in seen:
            continue
        seen.add(key)
        doc = (cls.__doc__ or "").strip().splitlines()
        catalog.setdefault(cls.status, []).append(
            (cls.code, cls.title, doc[0] if doc and cls.__doc__ != SPEError.__doc__
             else cls.__name__))
    for status, entries in _BUILTIN.items():
        for entry in entries:
            if (status, entry[0]) not in seen:
                seen.add((status, entry[0]))
                catalog.setdefault(status, []).append(entry)
    return catalog


def _describe(status: int, catalog: dict[int, list[tuple[str, str, str]]]) -> str:
    lines = [STATUS_MEANING.get(status, "An error.")]
    kinds = catalog.get(status, [])
    if kinds:
        lines.append("Problem types: " + ", ".join(f"`{code}` ({title})"
                                                   for code, title, _ in kinds) + ".")
    return " ".join(lines)


def _example(status: int, catalog: dict[int, list[tuple[str, str, str]]]) -> dict[str, Any]:
    kinds = catalog.get(status) or [("error", "Error", "")]
    code, title, _ = kinds[0]
    example: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + code, "title": title,
                               "status": status, "detail": STATUS_MEANING.get(status, title),
                               "instance": "/v1/permits/3f0c7f6e-3c5b-4c43-9d59-2b1f1cf0a3d2",
                               "request_id": "5d41402abc4b2a765d41402abc4b2a76"}
    if status == 422:
        example["errors"] = [{"loc": ["body", "privacy_budget", "epsilon"],
                              "msg": "Input should be greater than 0",
                              "type": "greater_than"}]
    return example


_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer realm=\"spe\"`",
                               "schema": {"type": "string"}}},
    405: {"Allow": {"description": "The methods this path has.",
                    "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before retrying.",
                          "schema": {"type": "integer"}}},
}


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the problems an operation can give (``Problem`` schema,
    ``application/problem+json``, a description and an example generated from the error
    classes loaded now; :func:`document_problems` refreshes them when the document is built)."""
    catalog = problem_catalog()
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {
            "model": Problem, "description": _describe(code, catalog),
            "content": {PROBLEM_MEDIA_TYPE: {"example": _example(code, catalog)}}}
        if code in _HEADERS:
            entry["headers"] = _HEADERS[code]
        out[code] = entry
    return out


def document_problems(document: dict[str, Any]) -> dict[str, Any]:
    """Post-process an OpenAPI document: every problem response of every operation is
    ``application/problem+json`` with the shared ``Problem`` schema, its description and
    example generated from the error classes loaded at that time."""
    catalog = problem_catalog()
    ref = {"$ref": "#/components/schemas/Problem"}
    for item in document.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for status, response in operation["responses"].items():
                if not status.isdigit() or int(status) < 400:
                    continue
                code = int(status)
                response["description"] = _describe(code, catalog)
                example = (response.get("content", {}).get(PROBLEM_MEDIA_TYPE, {})
                           .get("example")) or _example(code, catalog)
                response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": ref, "example": example}}
                if code in _HEADERS:
                    response["headers"] = _HEADERS[code]
    return document


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
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE,
                        headers=headers)


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Where and what of each schema error, never the offending input (it may hold data or a
    token)."""
    out = []
    for err in exc.errors():
        out.append({"loc": [str(p) for p in err.get("loc", ())], "msg": err.get("msg", ""),
                    "type": err.get("type", "")})
    return out


def _route_methods(routes: Any) -> Any:
    """(path regex, methods) of every route, through included routers (flattened lazily by
    FastAPI) and mounts."""
    for route in routes:
        regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and methods:
            yield regex, methods
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from _route_methods(candidates())
        elif getattr(route, "routes", None) and regex is None:
            yield from _route_methods(route.routes)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app has at this request's path (for ``Allow``)."""
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for regex, route_methods in _route_methods(request.app.router.routes):
        if regex.match(path):
            methods |= set(route_methods)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(SPEError)
    async def _spe_error(request: Request, exc: SPEError) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="spe"'
        return problem(exc.status, exc.code, exc.title, exc.detail, request, exc.errors,
                       headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, "invalid-input", "Invalid input",
                       "The request does not match the schema; see errors.", request,
                       validation_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # A body that is not JSON (or not UTF-8) is invalid input like any other.
            return problem(422, "invalid-input", "Invalid input",
                           "The request does not match the schema; see errors.", request,
                           [{"loc": ["body"], "msg": "The body is not valid JSON.",
                             "type": "json_invalid"}])
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return problem(exc.status_code, f"http-{exc.status_code}", detail, detail, request,
                       headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc,
                     extra={"fields": {"path": request.url.path}})
        return problem(500, "internal-error", "Internal error",
                       "The SPE could not complete the request.", request)
