"""The OpenAPI document says what the server does: error statuses instead of FastAPI's unused
422, ``input`` never null, ``/metrics`` as Prometheus text; 405 answers carry ``Allow``."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from qwen3emb.serve import ServeSettings, create_app


def test_the_document_lists_the_statuses_the_routes_answer(tmp_path: Path) -> None:
    client = TestClient(create_app(ServeSettings(bundle=tmp_path)))  # nothing loaded: 503s
    doc = client.get("/openapi.json").json()
    responses = doc["paths"]["/v1/embeddings"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert responses["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ApiError"}
    # No reranker served: its routes are not in the document and answer 404.
    assert not {"/v1/rerank", "/v2/rerank", "/rerank"} & set(doc["paths"])
    answer = client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert answer.status_code == 404 and "serves only embedding models" in answer.text
    assert "422" not in str(doc) and "HTTPValidationError" not in doc["components"]["schemas"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == [client.get("/metrics").headers["content-type"]]
    body = doc["components"]["schemas"]["EmbeddingRequest"]
    assert "input" in body["required"]
    assert all(s.get("type") != "null" for s in body["properties"]["input"]["anyOf"])
    assert client.get("/ready").status_code == 503  # the document matches what it says


def test_wrong_method_is_405_with_allow(tmp_path: Path) -> None:
    client = TestClient(create_app(ServeSettings(bundle=tmp_path)))
    answer = client.get("/v1/rerank")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert answer.json()["error"]["code"] == "method_not_allowed"
