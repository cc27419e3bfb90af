"""Pure ASGI middleware: request ids, security headers and the request body size limit.

The size limit holds for every route, whether the client sends ``Content-Length`` or a chunked
body: declared lengths over the limit are refused at once; chunked bodies are read up to the
limit and refused if they go past it, before any route (or the database) sees them. This is
the one place the limit (``Settings.max_request_bytes``) is enforced; each refusal is audited
(``api.request``, status 413, the path and method only).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spe.api.problems import PROBLEM_TYPE_BASE
from spe.audit import AuditAction, record_refusal

_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
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
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body:
                await self._too_large(scope, send_with_headers, request_id)
                return
            await self.app(scope, receive, send_with_headers)
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
                await self._too_large(scope, send_with_headers, request_id)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)

    async def _too_large(self, scope: Scope, send: Send, request_id: str) -> None:
        await self._audit_too_large(scope, request_id)
        problem: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + "payload-too-large",
            "title": "Payload too large",
            "status": 413,
            "detail": f"Request bodies are limited to {self.max_body} bytes.",
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

    async def _audit_too_large(self, scope: Scope, request_id: str) -> None:
        app = scope.get("app")
        state = getattr(getattr(app, "state", None), "spe", None)
        db = getattr(state, "db", None)
        if db is None:
            return
        await run_in_threadpool(
            record_refusal, db, AuditAction.API_REQUEST, actor=None, role=None,
            reason=f"Request bodies are limited to {self.max_body} bytes.", status=413,
            target=str(scope.get("path", ""))[:255], request_id=request_id,
            details={"method": scope.get("method")})
