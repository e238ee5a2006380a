"""`qwen3emb-export serve` on the tiny bundle, through the real `openai` client and raw HTTP.

The server runs in a subprocess (torch blocked); expected vectors come from the in-process
runtime on the same bundle.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import Server, metric, running_server  # noqa: E402

from qwen3emb.runtime import TextEmbedder  # noqa: E402
from qwen3emb.runtime.common import truncate_normalize  # noqa: E402

TEXTS = ["The capital of France is Paris.", "a b", "embedding vectors for retrieval " * 3]
MAX_TOKENS = 64
MAX_INPUTS = 64


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tiny_bundle, tmp_path_factory.mktemp("serve"), "--model-name", "tiny",
                        "--max-tokens", str(MAX_TOKENS), "--max-inputs", str(MAX_INPUTS),
                        "--batch-wait-ms", "20") as srv:
        yield srv


@pytest.fixture(scope="module")
def runtime(tiny_bundle: Path) -> TextEmbedder:
    return TextEmbedder(tiny_bundle, max_length=MAX_TOKENS)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server: Server, body: object, path: str = "/v1/embeddings", **kw: object
          ) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def _vectors(response: httpx.Response) -> np.ndarray:
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_openai_client_float_matches_the_runtime(client: openai.OpenAI,
                                                 runtime: TextEmbedder) -> None:
    result = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float",
                                      user="someone")
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    np.testing.assert_allclose(got, runtime.encode(TEXTS), atol=2e-6)
    assert [d.index for d in result.data] == [0, 1, 2] and result.model == "tiny"
    assert result.usage.prompt_tokens == sum(len(ids) for ids in runtime.tokenize(TEXTS))
    assert result.usage.total_tokens == result.usage.prompt_tokens


def test_openai_client_base64_default_and_dimensions(client: openai.OpenAI,
                                                     runtime: TextEmbedder) -> None:
    result = client.embeddings.create(model="tiny", input=TEXTS, dimensions=32)
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, truncate_normalize(runtime.encode(TEXTS), 32), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_base64_is_little_endian_float32(server: Server, runtime: TextEmbedder) -> None:
    response = _post(server, {"input": TEXTS[0], "encoding_format": "base64"})
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4"), runtime.encode(TEXTS[:1])[0],
                               atol=2e-6)
    alias = _post(server, {"input": TEXTS[0], "encoding_format": "base64"}, path="/embeddings")
    assert alias.json()["data"] == response.json()["data"]


def test_query_extensions_apply_the_instruction(client: openai.OpenAI,
                                                runtime: TextEmbedder) -> None:
    queries = ["capital of France?", "what is an embedding"]
    default = client.embeddings.create(model="tiny", input=queries,
                                       extra_body={"input_type": "query"})
    custom = client.embeddings.create(model="tiny", input=queries, encoding_format="float",
                                      extra_body={"input_type": "query",
                                                  "instruction": "Find the city"})
    np.testing.assert_allclose([d.embedding for d in default.data],
                               runtime.encode_queries(queries), atol=2e-6)
    np.testing.assert_allclose([d.embedding for d in custom.data],
                               runtime.encode_queries(queries, "Find the city"), atol=2e-6)
    assert default.usage.prompt_tokens == sum(
        len(ids) for ids in runtime.tokenize([f"Instruct: Given a web search query, retrieve "
                                              f"relevant passages that answer the query\n"
                                              f"Query:{q}" for q in queries]))


def test_token_ids_get_the_end_token(server: Server, runtime: TextEmbedder) -> None:
    ids = runtime.tokenize(TEXTS[:1])[0]
    assert ids[-1] == runtime.pad_id
    with_end = _vectors(_post(server, {"input": ids, "encoding_format": "float"}))
    without = _post(server, {"input": [ids[:-1]]})
    np.testing.assert_allclose(with_end[0], runtime.encode(TEXTS[:1])[0], atol=2e-6)
    np.testing.assert_allclose(_vectors(without), with_end, atol=1e-7)
    assert without.json()["usage"]["prompt_tokens"] == len(ids)


def test_long_inputs_are_cut_keeping_the_end_token_or_refused(server: Server,
                                                              runtime: TextEmbedder) -> None:
    long_text = "many words in a row " * 40
    cut = _post(server, {"input": [long_text]})
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == MAX_TOKENS
    np.testing.assert_allclose(_vectors(cut)[0], runtime.encode([long_text])[0], atol=2e-6)
    refused = _post(server, {"input": ["short", long_text], "truncate": False})
    assert refused.status_code == 413
    error = refused.json()["error"]
    assert error["param"] == "input[1]" and error["code"] == "input_too_long"
    full = len(TextEmbedder(runtime.manifest.root).tokenize([long_text])[0])
    assert f"has {full} tokens, above this server's limit of {MAX_TOKENS}" in error["message"]


@pytest.mark.parametrize("body, status, param, code", [
    ({"input": []}, 400, "input", "invalid_input"),
    ({"input": ""}, 400, "input[0]", "invalid_input"),
    ({"input": ["ok", 3.5]}, 400, "input[1]", "invalid_input"),
    ({"input": [[1, 2], "a"]}, 400, "input", "invalid_input"),
    ({"input": [1, 2, 10**9]}, 400, "input[0]", "invalid_token_id"),
    ({"input": [[-1]]}, 400, "input[0]", "invalid_token_id"),
    ({"input": [{"text": "a"}]}, 400, "input[0]", "invalid_input"),
    ({"input": "x", "dimensions": 3}, 400, "dimensions", "invalid_dimensions"),
    ({"input": "x", "dimensions": 65}, 400, "dimensions", "invalid_dimensions"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format", "invalid_request"),
    ({"input": "x", "input_typ": "query"}, 400, "input_typ", "invalid_request"),
    ({"input": "x", "input_type": "document", "instruction": "t"}, 400, "instruction",
     "invalid_instruction"),
    ({"input": "x", "instruction": " "}, 400, "instruction", "invalid_instruction"),
    ({"input": [5, 6], "input_type": "query"}, 400, "input_type", "invalid_input"),
    ({"model": "x"}, 400, "input", "invalid_request"),
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "model", "model_not_found"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, 413, "input", "too_many_inputs"),
])
def test_bad_input_gets_its_status_and_openai_error_shape(
        server: Server, body: dict, status: int, param: str, code: str) -> None:
    response = _post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error" and error["message"]
    assert _post(server, {"input": "still up"}).status_code == 200


@pytest.mark.parametrize("content, headers, fragment", [
    (b"{not json", {"content-type": "application/json"}, "not valid JSON"),
    (b'{"input": "x"}', {"content-type": "text/plain"}, "Content-Type: application/json"),
    (b"[1, 2]", {"content-type": "application/json"}, "must be a JSON object"),
])
def test_malformed_bodies_get_400(server: Server, content: bytes, headers: dict,
                                  fragment: str) -> None:
    response = httpx.post(server.url + "/v1/embeddings", content=content, headers=headers)
    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_route_and_method_are_openai_shaped(server: Server) -> None:
    assert httpx.get(server.url + "/v2/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/embeddings").status_code == 405


def test_concurrent_requests_equal_single_requests(server: Server) -> None:
    bodies = [{"input": [f"text number {i} " * (1 + i % 7)] + (["shared"] if i % 3 else []),
               "encoding_format": "float", **({"dimensions": 48} if i % 4 == 0 else {})}
              for i in range(40)]
    singles = [_vectors(_post(server, body)) for body in bodies]
    before = httpx.get(server.url + "/metrics").text

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as ac:
            return await asyncio.gather(*(ac.post("/v1/embeddings", json=b) for b in bodies))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(bodies)
    for single, response in zip(singles, responses):
        np.testing.assert_allclose(_vectors(response), single, atol=1e-6)
    after = httpx.get(server.url + "/metrics").text
    calls = metric(after, "qwen3emb_batch_size_count") - metric(before, "qwen3emb_batch_size_count")
    seqs = metric(after, "qwen3emb_batch_size_sum") - metric(before, "qwen3emb_batch_size_sum")
    assert seqs == sum(len(b["input"]) for b in bodies)
    assert calls < seqs, "concurrent requests were never batched together"


def test_models_info_health_ready(server: Server, client: openai.OpenAI,
                                  tiny_bundle: Path) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready"}
    info = httpx.get(server.url + "/info").json()
    manifest_sha = hashlib.sha256((tiny_bundle / "manifest.json").read_bytes()).hexdigest()
    assert info["bundle_sha256"] == manifest_sha
    assert (info["dimensions"], info["matryoshka"], info["precision"]) == (64, [32, 64], "fp32")
    assert info["providers"] == ["CPUExecutionProvider"] and info["max_tokens"] == MAX_TOKENS
    assert info["one_sequence_per_call"] is False and info["runtime"] == "onnxruntime"


def test_tokenize_shows_the_instruction_and_end_token(server: Server,
                                                      runtime: TextEmbedder) -> None:
    body = _post(server, {"input": ["hello"], "input_type": "query", "instruction": "Find"},
                 path="/tokenize").json()
    item = body["data"][0]
    assert item["text"] == "Instruct: Find\nQuery:hello"
    assert item["tokens"] == runtime.tokenize([item["text"]])[0]
    assert item["tokens"][-1] == runtime.pad_id and item["count"] == len(item["tokens"])


def test_metrics_expose_requests_latency_queue_batches_and_tokens(server: Server) -> None:
    _post(server, {"input": ["count me", "and me"]})
    text = httpx.get(server.url + "/metrics").text
    for name in ("qwen3emb_requests_total", "qwen3emb_request_seconds_bucket",
                 "qwen3emb_queue_seconds_bucket", "qwen3emb_inference_seconds_bucket",
                 "qwen3emb_batch_size_bucket", "qwen3emb_batch_tokens_bucket",
                 "qwen3emb_tokens_total", "qwen3emb_inputs_total"):
        assert metric(text, name) > 0, name
    assert 'qwen3emb_requests_total{route="/v1/embeddings",status="200"}' in text
    # Nothing waits now: both gauges are back to zero.
    assert "qwen3emb_queue_requests 0.0" in text and "qwen3emb_queue_tokens 0.0" in text
