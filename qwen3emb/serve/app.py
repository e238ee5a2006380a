"""The HTTP layer: ``create_app(settings)`` builds the FastAPI application.

Routes: ``POST /v1/embeddings`` (and ``/embeddings``), ``POST /tokenize``, ``GET /v1/models``,
``/info``, ``/health``, ``/ready``, ``/metrics``. Handlers validate, prepare inputs in a
thread, and hand them to the :class:`~qwen3emb.serve.batcher.Batcher`; inference never runs
on the event loop. Every error has OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen3emb import __version__
from qwen3emb.errors import InputError
from qwen3emb.runtime.common import check_dimensions, truncate_normalize
from qwen3emb.serve.backend import Backend, Prepared, load_backend
from qwen3emb.serve.batcher import Batcher, QueueFull
from qwen3emb.serve.metrics import ServerMetrics
from qwen3emb.serve.middleware import GuardMiddleware
from qwen3emb.serve.schemas import (
    ApiError,
    EmbeddingRequest,
    EmbeddingResponse,
    TokenizeRequest,
    embeddings_body,
    parse_input,
)
from qwen3emb.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

WARMUP_TEXT = "warm-up"
INLINE_PREPARE_CHARS = 4096
"""Text requests up to this many characters (or token ids) are tokenized on the event loop."""


class ServerState:
    """What the handlers share: settings, backend, batcher, metrics, readiness."""

    def __init__(self, settings: ServeSettings, backend: Backend | None) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = ServerMetrics()
        self.batcher: Batcher | None = None
        self.batch_tokens = self.batch_size = 0
        self.ready = False
        self.problem: str | None = None
        self.started = int(time.time())

    def require_ready(self) -> tuple[Backend, Batcher]:
        """The backend and batcher, or 503 while loading, warming up or shutting down."""
        if not self.ready or self.backend is None or self.batcher is None:
            reason = self.problem or "the model is loading or warming up"
            raise ApiError(503, f"not ready: {reason}; retry shortly", code="not_ready",
                           headers={"Retry-After": "1"})
        return self.backend, self.batcher

    def check_model(self, model: str | None) -> None:
        name = self.settings.served_name
        if model is not None and model != name:
            raise ApiError(404, f"model '{model}' is not served here; this server serves "
                           f"'{name}' (see GET /v1/models)", param="model",
                           code="model_not_found")

    async def start(self) -> None:
        """Load the backend when none was given, start the batcher, run one warm-up batch."""
        try:
            if self.backend is None:
                self.backend = await asyncio.to_thread(load_backend, self.settings)
            backend, settings = self.backend, self.settings
            self.batch_tokens, self.batch_size = settings.batch_limits(backend.on_cpu)
            self.batcher = Batcher(
                backend.run, lambda p: p.tokens, dim=backend.dim,
                max_batch_tokens=self.batch_tokens, max_batch_size=self.batch_size,
                wait_s=settings.batch_wait_ms / 1000,
                max_requests=settings.max_queue, max_tokens=settings.max_queue_tokens,
                single_sequence=backend.single_sequence, metrics=self.metrics)
            self.batcher.start()
            warm = await asyncio.to_thread(backend.prepare, [WARMUP_TEXT], input_type=None,
                                           instruction=None, truncate=True)
            await self.batcher.run_direct(warm)
            self.ready = True
            logger.info("ready: serving '%s' (%s %s)", settings.served_name, backend.runtime,
                        backend.precision)
        except Exception as e:  # the server stays up and says why it is not ready
            self.problem = e.one_line() if isinstance(e, InputError) else f"{e}"
            logger.error("the model could not be loaded: %s", self.problem)

    async def stop(self) -> None:
        self.ready = False
        self.problem = "the server is shutting down"
        if self.batcher is not None:
            await self.batcher.close()
        if self.backend is not None:
            self.backend.close()


def create_app(settings: ServeSettings, backend: Backend | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: limits, keys, names (see :class:`ServeSettings`).
        backend: an already loaded backend (the CLI loads it first so that a bad bundle fails
            before the port opens); ``None``: loaded at startup, ``/ready`` says 503 until then.

    Returns:
        The FastAPI app; run it with uvicorn (its lifespan starts the batcher).
    """
    state = ServerState(settings, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(state.start())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await state.stop()

    app = FastAPI(title="qwen3emb-export embeddings", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.add_middleware(GuardMiddleware, settings=settings, metrics=state.metrics)
    _add_error_handlers(app)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    @app.post("/embeddings", response_model=EmbeddingResponse, include_in_schema=False)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        """Embed strings, token-id lists or (Qwen3-VL) {text, image, video} objects."""
        backend, batcher = state.require_ready()
        state.check_model(body.model)
        items = parse_input(body.input, max_inputs=settings.max_inputs)
        try:
            width = check_dimensions(body.dimensions, dim=backend.dim, mrl_min=backend.mrl_min)
        except InputError as e:
            raise ApiError(400, e.one_line(), param="dimensions",
                           code="invalid_dimensions") from None
        prepared = await _prepare(backend, items, body.input_type, body.instruction,
                                  body.truncate)
        vectors = await _embed_until_disconnect(request, batcher, prepared, settings)
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if bad.size:
            raise ApiError(500, f"the model produced non-finite values for input[{bad[0]}] "
                           f"at precision {backend.precision}; serve a wider precision",
                           code="non_finite_output")
        # Always re-normalize in float32: fp16 graphs return norms up to 4.5e-4 off 1.
        vectors = truncate_normalize(vectors, width)
        tokens = sum(p.tokens for p in prepared)
        state.metrics.tokens.inc(tokens)
        state.metrics.inputs.inc(len(prepared))
        return JSONResponse(embeddings_body(vectors, encoding_format=body.encoding_format,
                                            model=settings.served_name, tokens=tokens))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """The token ids each input becomes (instruction, template and end token included)."""
        backend, _ = state.require_ready()
        state.check_model(body.model)
        items = parse_input(body.input, max_inputs=settings.max_inputs)
        prepared = await _prepare(backend, items, body.input_type, body.instruction,
                                  body.truncate)
        data = [{"index": i, "text": p.text, "tokens": _ids(p), "count": p.tokens,
                 "truncated": p.truncated} for i, p in enumerate(prepared)]
        total = sum(p.tokens for p in prepared)
        return {"object": "list", "data": data, "model": settings.served_name,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one model this server serves."""
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        state.check_model(model)
        return _model_card(state)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """Bundle hash, dimensions, Matryoshka range, precision, providers and limits."""
        backend, _ = state.require_ready()
        return {"model": settings.served_name, "version": __version__,
                "bundle": str(settings.bundle), **backend.info(),
                "default_task": settings.default_task,
                "query_template": backend.manifest.prompt.get("query_template"),
                "limits": {"max_inputs": settings.max_inputs,
                           "max_batch_tokens": state.batch_tokens,
                           "max_batch_size": state.batch_size,
                           "max_queue": settings.max_queue,
                           "max_queue_tokens": settings.max_queue_tokens,
                           "max_body_bytes": settings.max_body_bytes},
                "auth": bool(settings.api_keys)}

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        """Readiness: 503 until a warm-up batch has run, and again while shutting down."""
        state.require_ready()
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    return app


async def _prepare(backend: Backend, items: list[Any], input_type: str | None,
                   instruction: str | None, truncate: bool) -> list[Prepared]:
    """Tokenize small text requests inline (a thread hop costs more than ~50 µs of BPE);
    big ones, and every Qwen3-VL request (image decoding), in a thread."""
    size = sum(len(x) for x in items if not isinstance(x, dict))
    if backend.kind == "text" and size <= INLINE_PREPARE_CHARS:
        return backend.prepare(items, input_type=input_type, instruction=instruction,
                               truncate=truncate)
    return await asyncio.to_thread(backend.prepare, items, input_type=input_type,
                                   instruction=instruction, truncate=truncate)


def _ids(p: Prepared) -> list[int]:
    return list(p.payload if isinstance(p.payload, list) else p.payload.ids)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.settings.served_name, "object": "model", "created": state.started,
            "owned_by": "qwen3emb-export"}


async def _embed_until_disconnect(request: Request, batcher: Batcher, prepared: list[Prepared],
                                  settings: ServeSettings) -> np.ndarray:
    """Queue the request; if its client disconnects first, drop the queued work."""
    tokens = sum(p.tokens for p in prepared)
    if tokens > settings.max_queue_tokens:
        raise ApiError(413, f"the request has {tokens} tokens, above the queue's limit of "
                       f"{settings.max_queue_tokens}; split it into smaller requests",
                       param="input", code="request_too_large")
    work = asyncio.ensure_future(batcher.embed(prepared))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work not in done:
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, QueueFull):
            await work
        raise ApiError(499, "the client closed the connection", code="client_closed")
    try:
        return work.result()
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read, so only that is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_error_handlers(app: FastAPI) -> None:
    def respond(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            param = None
        elif first.get("type") == "extra_forbidden":
            message = (f"unknown field '{param}'; this API takes input, model, "
                       "encoding_format, dimensions, user, input_type, instruction, truncate")
        elif not loc:
            message = ("the body must be a JSON object sent with the header "
                       "'Content-Type: application/json'")
        else:
            message = f"{param}: {first.get('msg', 'invalid')}"
        return respond(ApiError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return respond(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                f"{exc.detail}", code=codes.get(exc.status_code)))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return respond(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                code="internal_error"))
