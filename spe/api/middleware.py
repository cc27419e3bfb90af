"""Pure ASGI middleware: request ids, security headers and the request body size limit.

The size limit holds for every route, whether the client sends ``Content-Length`` or a chunked
body: declared lengths over the limit are refused at once; chunked bodies are read up to the
limit and refused if they go past it, before any route (or the database) sees them. This is
the one place the API-wide limit (``Settings.max_request_bytes``) is enforced; each refusal is
audited (``api.request``, status 413, the path and method only).

A few routes take large bodies as a stream (:class:`StreamedRoute`: the airlock's file
upload): for them the limit is the route's own. A declared length over it is refused at once
(as above); a chunked body is passed on unbuffered, counted, and cut at the limit (the route
sees an error from its stream and cleans up; the client gets the same audited 413). The route
itself enforces its tighter, per-caller limit while it streams.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spe.api.problems import PROBLEM_TYPE_BASE
from spe.audit import AuditAction, record_refusal
from spe.audit import context as audit_context

_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
]


@dataclass(frozen=True)
class StreamedRoute:
    """A route whose body is streamed to it, up to ``max_body`` bytes."""

    method: str
    path: re.Pattern[str]
    max_body: int


class _BodyTooLarge(Exception):
    """Raised into a streamed route when its body passes the route's limit."""


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body: int,
                 streamed: Sequence[StreamedRoute] = ()) -> None:
        self.app = app
        self.max_body = max_body
        self.streamed = tuple(streamed)

    def _streamed_limit(self, scope: Scope) -> int | None:
        method, path = scope.get("method", ""), str(scope.get("path", ""))
        for route in self.streamed:
            if route.method == method and route.path.fullmatch(path):
                return route.max_body
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        client = scope.get("client")
        origin = audit_context.begin(str(client[0]) if client else None)
        try:
            await self._serve(scope, receive, send, request_id)
        finally:
            audit_context.end(origin)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        rid = request_id.encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid))
                headers.extend(_HEADERS)
                message["headers"] = headers
            await send(message)

        length: bytes | None = None
        chunked = False
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        streamed = self._streamed_limit(scope)
        limit = self.max_body if streamed is None else streamed
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                await self._too_large(scope, send_with_headers, request_id, limit)
                return
            await self.app(scope, receive, send_with_headers)
            return
        if streamed is not None and chunked:
            await self._stream(scope, receive, send_with_headers, request_id, streamed)
            return
        if not chunked:
            await self.app(scope, receive, send_with_headers)
            return
        # Chunked body: buffer it up to the limit, then replay it to the app.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if len(body) > self.max_body:
                await self._too_large(scope, send_with_headers, request_id, self.max_body)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                      limit: int) -> None:
        """Pass a chunked body through unbuffered, cutting it at ``limit`` bytes."""
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watch)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, send, request_id, limit)

    async def _too_large(self, scope: Scope, send: Send, request_id: str, limit: int) -> None:
        await self._audit_too_large(scope, request_id, limit)
        problem: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + "payload-too-large",
            "title": "Payload too large",
            "status": 413,
            "detail": f"Request bodies are limited to {limit} bytes.",
            "instance": scope.get("path", ""),
            "request_id": request_id,
        }
        payload = json.dumps(problem).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": payload})

    async def _audit_too_large(self, scope: Scope, request_id: str, limit: int) -> None:
        app = scope.get("app")
        state = getattr(getattr(app, "state", None), "spe", None)
        db = getattr(state, "db", None)
        if db is None:
            return
        await run_in_threadpool(
            record_refusal, db, AuditAction.API_REQUEST, actor=None, role=None,
            reason=f"Request bodies are limited to {limit} bytes.", status=413,
            target=str(scope.get("path", ""))[:255], request_id=request_id,
            details={"method": scope.get("method")})
