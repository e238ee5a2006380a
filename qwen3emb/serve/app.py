"""The HTTP layer: ``create_app(settings)`` builds the FastAPI application.

Routes: ``POST /v1/embeddings`` (and ``/embeddings``), ``POST /tokenize``, the rerank routes
of :mod:`~qwen3emb.serve.rerank_routes`, ``GET /v1/models``, ``/info``, ``/health``,
``/ready``, ``/metrics``. Handlers validate, prepare inputs in a thread, and hand them to the
model's :class:`~qwen3emb.serve.batcher.Batcher`; inference never runs on the event loop.
Every error has OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen3emb import __version__
from qwen3emb.errors import InputError
from qwen3emb.runtime.common import check_dimensions, truncate_normalize
from qwen3emb.serve.backend import Backend, Prepared
from qwen3emb.serve.middleware import GuardMiddleware
from qwen3emb.serve.openapi import install_openapi
from qwen3emb.serve.rerank_routes import RERANK_FIELDS, TEI_FIELDS, add_rerank_routes
from qwen3emb.serve.schemas import (
    ApiError,
    EmbeddingRequest,
    EmbeddingResponse,
    TokenizeRequest,
    embeddings_body,
    parse_input,
)
from qwen3emb.serve.settings import ServeSettings
from qwen3emb.serve.state import ModelState, ServerState

logger = logging.getLogger(__name__)

FIELDS = {"/v1/embeddings": "input, model, encoding_format, dimensions, user, input_type, "
                            "instruction, truncate",
          "/tokenize": "input, model, input_type, instruction, truncate",
          "/v1/rerank": RERANK_FIELDS, "/v2/rerank": RERANK_FIELDS, "/rerank": TEI_FIELDS}
"""What each POST route accepts, for the message that names an unknown field."""
INLINE_PREPARE_CHARS = 4096
"""Text requests up to this many characters (or token ids) are tokenized on the event loop."""


def create_app(settings: ServeSettings | Sequence[ServeSettings],
               backend: Backend | Sequence[Backend | None] | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: limits, keys, names (see :class:`ServeSettings`); one per served bundle,
            the first one's keys, body cap and limits holding for all.
        backend: already loaded backends, one per settings (the CLI loads them first so that
            a bad bundle fails before the port opens); ``None``: loaded at startup, ``/ready``
            says 503 until then.

    Returns:
        The FastAPI app; run it with uvicorn (its lifespan starts the batchers).

    Raises:
        InputError: two bundles under one model name.
    """
    all_settings = [settings] if isinstance(settings, ServeSettings) else list(settings)
    backends = (list(backend) if isinstance(backend, Sequence)
                else [backend] * len(all_settings) if backend is None else [backend])
    state = ServerState(all_settings, backends)
    settings = state.settings

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
    install_openapi(app, state)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    @app.post("/embeddings", response_model=EmbeddingResponse, include_in_schema=False)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        """Embed strings, token-id lists or (Qwen3-VL) {text, image, video} objects."""
        served, backend, _ = state.require_ready(body.model, "embed")
        items = parse_input(body.input, max_inputs=settings.max_inputs)
        try:
            width = check_dimensions(body.dimensions, dim=backend.dim, mrl_min=backend.mrl_min)
        except InputError as e:
            raise ApiError(400, e.one_line(), param="dimensions",
                           code="invalid_dimensions") from None
        prepared = await _prepare(backend, items, body.input_type, body.instruction,
                                  body.truncate)
        vectors = await served.run(request, prepared)
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
                                            model=served.name, tokens=tokens))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """The token ids each input becomes (instruction, template and end token included)."""
        served, backend, _ = state.require_ready(body.model, "embed")
        items = parse_input(body.input, max_inputs=settings.max_inputs)
        prepared = await _prepare(backend, items, body.input_type, body.instruction,
                                  body.truncate)
        data = [{"index": i, "text": p.text, "tokens": _ids(p), "count": p.tokens,
                 "truncated": p.truncated} for i, p in enumerate(prepared)]
        total = sum(p.tokens for p in prepared)
        return {"object": "list", "data": data, "model": served.name,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    add_rerank_routes(app, state)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The models this server serves, in the order it was given them."""
        return {"object": "list", "data": [_model_card(state, m) for m in state.models]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        if model not in state.models:
            state.lookup(model, "embed")  # the 404 naming what is served
        return _model_card(state, model)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """Per model: bundle hash, dimensions, Matryoshka range, precision, providers, limits;
        the first model's fields also at the top level."""
        state.require_all_ready()
        described = [_describe(m) for m in state.models.values()]
        return {**described[0], "models": described}

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        """Readiness: 503 until every model has run a warm-up batch, and while shutting down."""
        state.require_all_ready()
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


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.started,
            "owned_by": "qwen3emb-export", "task": state.models[name].task}


def _describe(served: ModelState) -> dict[str, Any]:
    backend, _ = served.require_ready()
    settings = served.settings
    extra: dict[str, Any] = {}
    if served.task == "embed":
        extra = {"default_task": settings.default_task,
                 "query_template": backend.manifest.prompt.get("query_template")}
    return {"model": served.name, "task": served.task, "version": __version__,
            "bundle": str(settings.bundle), **backend.info(), **extra,
            "limits": {"max_inputs": settings.max_inputs,
                       "max_batch_tokens": served.batch_tokens,
                       "max_batch_size": served.batch_size,
                       "max_queue": settings.max_queue,
                       "max_queue_tokens": settings.max_queue_tokens,
                       "max_body_bytes": settings.max_body_bytes},
            "auth": bool(settings.api_keys)}


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
            takes = FIELDS.get(request.url.path, FIELDS["/v1/embeddings"])
            message = f"unknown field '{param}'; this route takes {takes}"
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
                                f"{exc.detail}", code=codes.get(exc.status_code),
                                headers=dict(exc.headers or {})))  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return respond(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                code="internal_error"))
