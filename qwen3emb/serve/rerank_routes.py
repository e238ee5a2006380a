"""The rerank routes: Cohere's and Jina's shape at ``POST /v1/rerank`` and ``/v2/rerank`` (as
vLLM serves them), TEI's at ``POST /rerank``.

A request's pairs are prepared with the model card's prompt and queued on the reranker's
batcher like embedding inputs; the answer is sorted best first (ties keep input order).
Errors have the same OpenAI shape as every other route.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, WithJsonSchema

from qwen3emb.serve.backend import Prepared
from qwen3emb.serve.schemas import NOT_BLANK, ApiError, JsonInt
from qwen3emb.serve.state import ModelState, ServerState

INLINE_PREPARE_CHARS = 4096
"""Requests up to this many characters are tokenized on the event loop (see ``app``)."""
RERANK_FIELDS = ("model, query, documents, top_n, return_documents, instruction, truncate")
TEI_FIELDS = "query, texts, raw_scores, return_text, truncate, model, instruction"


class RerankDocument(BaseModel):
    """A document (or a Qwen3-VL reranker's query) given as an object: Cohere's and Jina's
    ``{"text": ...}``; for Qwen3-VL rerankers also ``image`` and ``video`` (``data:`` URIs, or
    files under ``--allow-files``); a Qwen3-VL side with none of them reads ``NULL``, as in
    the released code. The OpenAPI document narrows it to ``{text}`` when no Qwen3-VL
    reranker is served."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = None
    image: StrictStr | None = None
    video: StrictStr | None = None

    def item(self) -> dict[str, str]:
        """The fields given, as a runtime item."""
        return {k: v for k, v in (("text", self.text), ("image", self.image),
                                  ("video", self.video)) if v is not None}


class RerankRequest(BaseModel):
    """``POST /v1/rerank`` and ``/v2/rerank``: Cohere's fields, plus ``instruction``."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr | RerankDocument = Field(
        description="The query (may be empty); for Qwen3-VL rerankers also a {text, image, "
                    "video} object.")
    documents: list[StrictStr | RerankDocument] = Field(
        description="The candidates: strings or {text} objects (may be empty strings); for "
                    "Qwen3-VL rerankers {text, image, video} objects.",
        json_schema_extra={"minItems": 1})
    model: StrictStr | None = Field(None, description="A served reranker's name; default the "
                                    "first reranker served.")
    top_n: Annotated[JsonInt, Field(ge=1), WithJsonSchema({"type": "integer", "minimum": 1})
                     ] | None = Field(None, description="Return only the best N.")
    return_documents: StrictBool = Field(True, description="Echo each document's text.")
    instruction: StrictStr | None = Field(
        None, description="The task; default the model card's web-search instruction.",
        json_schema_extra=NOT_BLANK)
    truncate: StrictBool = Field(True, description="Cut pairs above the token limit the model "
                                 "card's way (content longest first); false: refuse with 413.")


class TEIRerankRequest(BaseModel):
    """``POST /rerank``: text-embeddings-inference's fields, plus ``model`` and ``instruction``."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    texts: list[StrictStr] = Field(json_schema_extra={"minItems": 1})
    raw_scores: StrictBool = Field(False, description="The logit (yes minus no) instead of "
                                   "its sigmoid.")
    return_text: StrictBool = False
    truncate: StrictBool = Field(False, description="As TEI: refuse over-long pairs unless "
                                 "true, which cuts them the model card's way.")
    model: StrictStr | None = None
    instruction: StrictStr | None = Field(None, json_schema_extra=NOT_BLANK)


class RerankResultDocument(BaseModel):
    """The document as sent (a string as ``{text}``; a Qwen3-VL document's fields as given)."""

    text: str | None = None
    image: str | None = None
    video: str | None = None


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankResultDocument | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    """The response, as Cohere, Jina and vLLM send it."""

    id: str
    results: list[RerankResult]
    model: str
    usage: RerankUsage
    meta: dict[str, Any]


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


def add_rerank_routes(app: FastAPI, state: ServerState) -> None:
    """Register ``/v1/rerank``, ``/v2/rerank`` and ``/rerank`` on ``app``."""

    async def cohere(body: RerankRequest, request: Request, version: str) -> Response:
        query = body.query if isinstance(body.query, str) else body.query.item()
        documents = [d if isinstance(d, str) else d.item() for d in body.documents]
        served, rows, prepared = await _score(state, request, body.model, query,
                                              documents, "documents", body.instruction,
                                              body.truncate)
        order = _best_first(rows[:, 0])[:body.top_n]
        shown = [{"text": d} if isinstance(d, str) else d for d in documents]
        results = [{"index": i, "relevance_score": float(rows[i, 0]),
                    **({"document": shown[i]} if body.return_documents else {})}
                   for i in order]
        tokens = sum(p.tokens for p in prepared)
        return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "results": results,
                             "model": served.name, "usage": {"total_tokens": tokens},
                             "meta": {"api_version": {"version": version},
                                      "billed_units": {"search_units": 1}}})

    @app.post("/v1/rerank", response_model=RerankResponse)
    async def rerank_v1(body: RerankRequest, request: Request) -> Response:
        """Rerank documents against a query (Cohere v1 and Jina shape)."""
        return await cohere(body, request, "1")

    @app.post("/v2/rerank", response_model=RerankResponse)
    async def rerank_v2(body: RerankRequest, request: Request) -> Response:
        """Rerank documents against a query (Cohere v2 shape)."""
        return await cohere(body, request, "2")

    @app.post("/rerank", response_model=list[TEIRank])
    async def rerank_tei(body: TEIRerankRequest, request: Request) -> Response:
        """Rerank texts against a query (text-embeddings-inference's shape)."""
        _, rows, _ = await _score(state, request, body.model, body.query, body.texts,
                                  "texts", body.instruction, body.truncate)
        column = 1 if body.raw_scores else 0
        return JSONResponse([{"index": i, "score": float(rows[i, column]),
                              **({"text": body.texts[i]} if body.return_text else {})}
                             for i in _best_first(rows[:, column])])


def _texts(query: Any, documents: list[Any], param: str) -> tuple[str, list[str]]:
    """A text reranker's query and documents as strings.

    Raises:
        ApiError: 400 for images, videos, or an object without text.
    """
    def text(value: Any, where: str) -> str:
        if isinstance(value, str):
            return value
        extra = sorted(set(value) - {"text"})
        if extra or "text" not in value:
            why = f"has {' and '.join(extra)}" if extra else "has no text"
            raise ApiError(400, f"{where} {why}; this model is a text reranker: send "
                           "strings or {text} objects", param=where, code="invalid_input")
        return str(value["text"])

    return text(query, "query"), [text(d, f"{param}[{i}]") for i, d in enumerate(documents)]


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str) else sum(len(v) for v in value.values())


async def _score(state: ServerState, request: Request, model: str | None, query: Any,
                 documents: list[Any], param: str, instruction: str | None, truncate: bool
                 ) -> tuple[ModelState, np.ndarray, list[Prepared]]:
    """Prepare and queue the pairs on the chosen reranker → its ``[n, 2]`` rows (score, logit).

    Raises:
        ApiError: 400 no documents; 413 too many documents, or a pair too long without
            ``truncate``; 500 non-finite scores; and the model's lookup and queue errors.
    """
    served, backend, _ = state.require_ready(model, "rerank")
    limit = served.settings.max_inputs
    if not documents:
        raise ApiError(400, f"{param} is an empty list; send at least one document",
                       param=param, code="invalid_input")
    if len(documents) > limit:
        raise ApiError(413, f"{param} has {len(documents)} documents, above this server's "
                       f"limit of {limit} per request; split it into several requests",
                       param=param, code="too_many_inputs")
    if backend.kind != "vl-rerank":
        query, documents = _texts(query, documents, param)
    prepare = backend.prepare_pairs  # type: ignore[attr-defined]
    inline = backend.kind != "vl-rerank"  # decoding media belongs off the event loop
    if inline and _size(query) + sum(_size(d) for d in documents) <= INLINE_PREPARE_CHARS:
        prepared = prepare(query, documents, instruction=instruction, truncate=truncate,
                           param=param)
    else:
        prepared = await asyncio.to_thread(prepare, query, documents, instruction=instruction,
                                           truncate=truncate, param=param)
    rows = await served.run(request, prepared, param=param)
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if bad.size:
        raise ApiError(500, f"the model produced a non-finite score for {param}[{bad[0]}] at "
                       f"precision {backend.precision}; serve a wider precision",
                       code="non_finite_output")
    state.metrics.tokens.inc(sum(p.tokens for p in prepared))
    state.metrics.inputs.inc(len(prepared))
    return served, rows, prepared


def _best_first(scores: np.ndarray) -> list[int]:
    """Indices by descending score; ties keep input order."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
