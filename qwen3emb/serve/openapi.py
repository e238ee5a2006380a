"""The OpenAPI document at ``/openapi.json``, made to say what the server does.

FastAPI's generated document promises a 422 the server never sends (validation errors are 400
in OpenAI's shape), lists none of the statuses the guards and handlers return, and describes
``/metrics`` as JSON. :func:`install_openapi` post-processes it once: the error statuses each
route can answer, with the error body's schema, and the Prometheus text type.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from qwen3emb.serve.state import ServerState

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}
WHY = {400: "Invalid request (bad JSON, unknown field, bad value); OpenAI's error shape",
       401: "Missing or wrong API key (when the server has keys)",
       404: "The model is not served here",
       413: "Body, inputs or tokens above the server's limits",
       429: "The queue is full; Retry-After says when to retry",
       500: "The model produced non-finite values",
       503: "Not ready: loading, warming up or shutting down; Retry-After: 1"}
INFERENCE = (400, 401, 404, 413, 429, 500, 503)
"""What a route that runs the model can answer, besides 200."""
ROUTE_ERRORS = {"/tokenize": (400, 401, 404, 413, 503), "/v1/models": (401,),
                "/v1/models/{model}": (401, 404), "/info": (401, 503), "/ready": (503,),
                "/health": (), "/metrics": ()}


def install_openapi(app: FastAPI, state: ServerState) -> None:
    """Replace ``app.openapi`` with a builder of the corrected document, whose value ranges
    are the served models' (kept once every model has loaded)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = copy.deepcopy(get_openapi(  # the post-processing must not touch constants
            title=app.title, version=app.version, routes=app.routes,
            description=app.description))
        describe_errors(schema)
        describe_limits(schema, state)
        if all(m.backend is not None for m in state.models.values()):
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def describe_errors(schema: dict[str, Any]) -> None:
    """Drop the 422s, add each route's error statuses and ``/metrics``' text content type."""
    schema.setdefault("components", {}).setdefault("schemas", {})["ApiError"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/ApiError"}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in ROUTE_ERRORS.get(path, INFERENCE):
                responses[str(status)] = {"description": WHY[status],
                                          "content": {"application/json": {"schema": ref}}}
    metrics = schema.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST as METRICS_TYPE

        metrics["responses"]["200"] = {"description": "Prometheus text exposition format",
                                       "content": {METRICS_TYPE: {"schema": {"type": "string"}}}}
    for name in ("HTTPValidationError", "ValidationError"):  # only the 422s used them
        schema["components"]["schemas"].pop(name, None)


LISTS = {"EmbeddingRequest": "input", "TokenizeRequest": "input", "RerankRequest": "documents",
         "TEIRerankRequest": "texts"}
"""The request fields whose item count ``--max-inputs`` bounds (413 above it)."""


def describe_limits(schema: dict[str, Any], state: ServerState) -> None:
    """The server's ranges: ``maxItems`` on every list of inputs or documents (a token-id
    list is one input), token ids within the vocabulary and ``dimensions`` within the
    Matryoshka range of every loaded embedding model."""
    models = schema.get("components", {}).get("schemas", {})
    max_inputs = state.settings.max_inputs
    for model, name in LISTS.items():
        field = models.get(model, {}).get("properties", {}).get(name)
        if field is None:
            continue
        for variant in field.get("anyOf", [field]):
            is_ids = variant.get("items", {}).get("type") == "integer"
            if variant.get("type") == "array" and not is_ids:
                variant["maxItems"] = max_inputs
    describe_models(schema, state)
    describe_documents(models, state)
    embedders = [m.backend for m in state.models.values()
                 if m.task == "embed" and m.backend is not None]
    kinds = {b.kind for b in embedders}
    for model in ("EmbeddingRequest", "TokenizeRequest"):
        body = models.get(model)
        if body is None:
            continue
        field = body["properties"]["input"]
        if kinds == {"text"}:  # text bundles refuse {text, image, video} objects
            field["anyOf"] = [v for v in field["anyOf"] if "anyOf" not in v.get("items", {})]
        elif kinds == {"vl"}:  # VL bundles refuse token ids
            field["anyOf"] = [v for v in field["anyOf"] if not any(
                n.get("type") == "integer" for n in _walk(v))]
        body["allOf"] = _query_rules(max_inputs)
    vocab = [int(b.vocab_size) for b in embedders if hasattr(b, "vocab_size")]
    if vocab:
        for model in ("EmbeddingRequest", "TokenizeRequest"):
            field = models.get(model, {}).get("properties", {}).get("input", {})
            for node in _walk(field):
                if node.get("type") == "integer":
                    node["maximum"] = min(vocab) - 1
    if embedders:
        dims = models.get("EmbeddingRequest", {}).get("properties", {}).get("dimensions", {})
        for variant in dims.get("anyOf", []):
            if variant.get("type") == "integer":
                variant["minimum"] = max(b.mrl_min for b in embedders)
                variant["maximum"] = min(b.dim for b in embedders)


def describe_documents(models: dict[str, Any], state: ServerState) -> None:
    """Without a Qwen3-VL reranker, a rerank document object is ``{text}`` and the query a
    string (text rerankers refuse images, videos and objects without text)."""
    kinds = {m.backend.kind for m in state.models.values()
             if m.task == "rerank" and m.backend is not None}
    if "vl-rerank" in kinds and state.settings.allow_files is None:
        # Without --allow-files a medium is a base64 data: URI (a file name is refused).
        fields = models.get("RerankDocument", {}).get("properties", {})
        for key in ("image", "video"):
            for variant in fields.get(key, {}).get("anyOf", []):
                if variant.get("type") == "string":
                    variant["pattern"] = r"^data:[^,]*;base64,"
    if not kinds or "vl-rerank" in kinds:
        return
    document = models.get("RerankDocument")
    if document is not None:
        document["properties"] = {"text": {"type": "string", "title": "Text"}}
        document["required"] = ["text"]
    query = models.get("RerankRequest", {}).get("properties", {}).get("query")
    if query is not None and "anyOf" in query:
        query["anyOf"] = [v for v in query["anyOf"] if "$ref" not in v]


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every object in a JSON schema fragment, depth first."""
    if isinstance(node, list):
        return [d for item in node for d in _walk(item)]
    if not isinstance(node, dict):
        return []
    return [node, *(d for value in node.values() for d in _walk(value))]


def _query_rules(max_inputs: int) -> list[dict[str, Any]]:
    """What the handlers refuse beyond each field's own range: an instruction on documents,
    and token ids as queries (no template can apply to them)."""
    text = {"type": "string", "minLength": 1}
    document = {"required": ["input_type"], "properties": {"input_type": {"const": "document"}}}
    query = {"anyOf": [{"required": ["input_type"],
                        "properties": {"input_type": {"const": "query"}}},
                       {"required": ["instruction"],
                        "properties": {"instruction": {"type": "string"}}}]}
    texts = {"anyOf": [text, {"type": "array", "minItems": 1, "maxItems": max_inputs,
                              "items": {"anyOf": [text, {"type": "object"}]}}]}
    return [{"if": document, "then": {"properties": {"instruction": {"type": "null"}}}},
            {"if": query, "then": {"properties": {"input": texts}}}]


ROUTE_TASK = {"/v1/embeddings": "embed", "/tokenize": "embed", "/v1/rerank": "rerank",
              "/v2/rerank": "rerank", "/rerank": "rerank"}
BODY_TASK = {"EmbeddingRequest": "embed", "TokenizeRequest": "embed", "RerankRequest": "rerank",
             "TEIRerankRequest": "rerank"}


def describe_models(schema: dict[str, Any], state: ServerState) -> None:
    """Each body's ``model`` is one of the served models of its route's kind; the routes of a
    kind no bundle has are left out of the document (they answer 404)."""
    names = {task: [m.name for m in state.models.values() if m.task == task]
             for task in ("embed", "rerank")}
    paths = schema.get("paths", {})
    for path, task in ROUTE_TASK.items():
        if not names[task]:
            paths.pop(path, None)
    bodies = schema.get("components", {}).get("schemas", {})
    for body, task in BODY_TASK.items():
        field = bodies.get(body, {}).get("properties", {}).get("model")
        if field is not None and names[task]:
            field["anyOf"] = [{"type": "string", "enum": names[task]}, {"type": "null"}]
