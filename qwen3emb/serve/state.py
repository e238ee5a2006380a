"""What the handlers share: the served models (each with its backend, batcher and readiness),
the metrics, and the rule that picks a request's model.

One process may serve several bundles, each under its own name: embedding bundles answer
``/v1/embeddings``, rerankers ``/v1/rerank``, ``/v2/rerank`` and ``/rerank``. A request without
``model`` goes to the first bundle of the kind its route serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence

import numpy as np
from fastapi import Request

from qwen3emb.errors import InputError
from qwen3emb.serve.backend import Backend, Prepared, load_backend
from qwen3emb.serve.batcher import Batcher, QueueFull
from qwen3emb.serve.metrics import ServerMetrics
from qwen3emb.serve.schemas import ApiError
from qwen3emb.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

ROUTE_OF = {"embed": "POST /v1/embeddings", "rerank": "POST /v1/rerank (or /v2/rerank, /rerank)"}


def bundle_task(settings: ServeSettings, backend: Backend | None) -> str:
    """``embed`` or ``rerank``: from the loaded backend, else the bundle's manifest."""
    if backend is not None:
        return "rerank" if backend.kind in ("rerank", "vl-rerank") else "embed"
    try:
        data = json.loads((settings.bundle / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "embed"  # loading will fail and say why; /ready reports it
    return "rerank" if isinstance(data, dict) and data.get("task") == "rerank" else "embed"


class ModelState:
    """One served bundle: settings, backend, batcher, readiness."""

    def __init__(self, settings: ServeSettings, backend: Backend | None,
                 metrics: ServerMetrics) -> None:
        self.settings = settings
        self.name = settings.served_name
        self.task = bundle_task(settings, backend)
        self.backend = backend
        self.metrics = metrics
        self.batcher: Batcher | None = None
        self.batch_tokens = self.batch_size = 0
        self.ready = False
        self.problem: str | None = None

    def require_ready(self) -> tuple[Backend, Batcher]:
        """The backend and batcher, or 503 while loading, warming up or shutting down."""
        if not self.ready or self.backend is None or self.batcher is None:
            reason = self.problem or "the model is loading or warming up"
            raise ApiError(503, f"not ready: '{self.name}': {reason}; retry shortly",
                           code="not_ready", headers={"Retry-After": "1"})
        return self.backend, self.batcher

    async def run(self, request: Request, prepared: list[Prepared],
                  param: str = "input") -> np.ndarray:
        """Queue a request's sequences on this model; if the client disconnects first, drop
        the queued work. Returns the batcher's rows, in order.

        Raises:
            ApiError: 413 above the queue's token limit, 429 queue full, 499 client gone.
        """
        _, batcher = self.require_ready()
        tokens = sum(p.tokens for p in prepared)
        limit = self.settings.max_queue_tokens
        if tokens > limit:
            raise ApiError(413, f"the request has {tokens} tokens, above the queue's limit of "
                           f"{limit}; split it into smaller requests", param=param,
                           code="request_too_large")
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
            warm = await asyncio.to_thread(backend.warmup_inputs)
            await self.batcher.run_direct(warm)
            self.ready = True
            logger.info("ready: serving '%s' (%s, %s %s)", self.name, backend.kind,
                        backend.runtime, backend.precision)
        except Exception as e:  # the server stays up and says why it is not ready
            self.problem = e.one_line() if isinstance(e, InputError) else f"{e}"
            logger.error("'%s' could not be loaded: %s", self.name, self.problem)

    async def stop(self) -> None:
        self.ready = False
        self.problem = "the server is shutting down"
        if self.batcher is not None:
            await self.batcher.close()
        if self.backend is not None:
            self.backend.close()


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read, so only that is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ServerState:
    """The served models, in the order given, and what they share.

    Args:
        settings: one per bundle; the first one's keys, body cap and limits hold for all
            (the CLI builds them from one set of options).
        backends: already loaded backends, one per settings entry, or None to load at startup.

    Raises:
        InputError: two bundles under the same model name.
    """

    def __init__(self, settings: Sequence[ServeSettings],
                 backends: Sequence[Backend | None]) -> None:
        self.settings = settings[0]
        self.metrics = ServerMetrics()
        self.models: dict[str, ModelState] = {}
        for s, backend in zip(settings, backends, strict=True):
            if s.served_name in self.models:
                raise InputError(f"two bundles are served as '{s.served_name}'",
                                 hint="Give each its own --model-name")
            self.models[s.served_name] = ModelState(s, backend, self.metrics)
        self.metrics.watch_queues(lambda: [m.batcher.depth for m in self.models.values()
                                           if m.batcher is not None])
        self.started = int(time.time())

    @property
    def first(self) -> ModelState:
        return next(iter(self.models.values()))

    def lookup(self, model: str | None, task: str) -> ModelState:
        """The model a request names (or the first of ``task``), checked against its route.

        Raises:
            ApiError: 404 for a name not served here, or no ``model`` where no bundle of
                ``task`` is served; 400 for a model of the other kind.
        """
        if model is None:
            chosen = next((m for m in self.models.values() if m.task == task), None)
            if chosen is None:  # as if the route were not there: 404
                other = "rerankers" if task == "embed" else "embedding models"
                raise ApiError(404, f"this server serves only {other} "
                               f"({', '.join(self.models)}); send them to "
                               f"{ROUTE_OF['rerank' if task == 'embed' else 'embed']}",
                               param="model", code="model_not_found")
            return chosen
        found = self.models.get(model)
        if found is None:
            raise ApiError(404, f"model '{model}' is not served here; this server serves "
                           f"{', '.join(repr(n) for n in self.models)} (see GET /v1/models)",
                           param="model", code="model_not_found")
        if found.task != task:
            what = "a reranker" if found.task == "rerank" else "an embedding model"
            raise ApiError(400, f"model '{model}' is {what}; send its requests to "
                           f"{ROUTE_OF[found.task]}", param="model", code="wrong_model_kind")
        return found

    def require_ready(self, model: str | None, task: str) -> tuple[ModelState, Backend, Batcher]:
        """:meth:`lookup`, then 503 unless that model is ready."""
        state = self.lookup(model, task)
        backend, batcher = state.require_ready()
        return state, backend, batcher

    def require_all_ready(self) -> None:
        """503 unless every served model is ready."""
        for state in self.models.values():
            state.require_ready()

    async def start(self) -> None:
        await asyncio.gather(*(m.start() for m in self.models.values()))

    async def stop(self) -> None:
        for m in self.models.values():
            await m.stop()
