"""A pure ASGI middleware in front of every route: body-size cap (413), API keys (401), and the
request counter and latency histogram.

It is plain ASGI rather than Starlette's ``BaseHTTPMiddleware`` so that the handlers still see
the client's ``http.disconnect`` (a disconnected client's queued work is dropped).
"""

from __future__ import annotations

import json
import time
from typing import Any

from qwen3emb.serve.metrics import ServerMetrics, observe_request
from qwen3emb.serve.schemas import ApiError
from qwen3emb.serve.settings import ServeSettings

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/openapi.json"})
"""Probes and scrapers need no key."""
ROUTES = frozenset({"/v1/embeddings", "/embeddings", "/tokenize", "/v1/rerank", "/v2/rerank",
                    "/rerank", "/v1/models", "/info", "/health", "/ready", "/metrics"})


class GuardMiddleware:
    """Check size and key before the app sees a request; count every response."""

    def __init__(self, app: Any, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in ROUTES else "/v1/models" if path.startswith(
            "/v1/models/") else "other"
        status = [500]

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            error = self._auth_error(scope)
            body = b""
            if error is None:
                body, error = await self._read_body(scope, receive)
            if error is not None:
                await _send_error(counted_send, error)
                return
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            observe_request(self.metrics, route, status[0], time.perf_counter() - start)

    def _auth_error(self, scope: dict[str, Any]) -> ApiError | None:
        if not self.settings.api_keys or scope.get("path") in OPEN_PATHS:
            return None
        header = _header(scope, b"authorization")
        scheme, _, key = (header or "").partition(" ")
        if header is None or scheme.lower() != "bearer" or not key.strip():
            return ApiError(401, "missing API key; send the header 'Authorization: Bearer KEY'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not self.settings.key_matches(key.strip()):
            return ApiError(401, "invalid API key; check the key you were given",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, scope: dict[str, Any], receive: Any
                         ) -> tuple[bytes, ApiError | None]:
        """The whole body, or a 413 as soon as it passes the cap (declared or streamed)."""
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        too_big = ApiError(413, f"the request body is larger than this server's limit of "
                           f"{limit} bytes; send fewer or smaller inputs",
                           code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", too_big
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return b"", None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", ApiError(499, "the client closed the connection")
            size += len(message.get("body", b""))
            if size > limit:
                return b"", too_big
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive: Any) -> Any:
    """A receive that hands the buffered body over once, then passes through (disconnects)."""
    sent = [False]

    async def replay() -> dict[str, Any]:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: dict[str, Any] = await receive()
        return message

    return replay


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _send_error(send: Any, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if error.status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
