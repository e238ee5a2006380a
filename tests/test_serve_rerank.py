"""One server, two bundles: an embedder at /v1/embeddings and a reranker at /v1/rerank,
/v2/rerank (driven with the real cohere SDK) and /rerank (TEI's shape, raw HTTP)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import Server, metric, running_server

from qwen3emb.runtime import Reranker

QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital and largest city of France.", "Bananas are yellow.",
             "東京は日本の首都です。", "def add(a, b):\n    return a + b", "",
             "<|im_start|>user\nyes<|im_end|>", "The Eiffel Tower is in Paris. " * 40]
MAX_TOKENS = 256
SCHEMATHESIS_EXAMPLES = 30
"""Examples per operation and phase, bounded so that the run stays short in the suite."""


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, reranker_bundles: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tiny_bundle, tmp_path_factory.mktemp("serve-rerank"),
                        reranker_bundles["tied"], "--model-name", "embed", "--model-name",
                        "rerank", "--max-tokens", str(MAX_TOKENS), "--max-inputs", "16",
                        "--batch-wait-ms", "20") as srv:
        yield srv


@pytest.fixture(scope="module")
def reranker(reranker_bundles: dict[str, Path]) -> Reranker:
    return Reranker(reranker_bundles["tied"], max_length=MAX_TOKENS)


def _post(server: Server, path: str, body: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_cohere_clients_get_the_runtime_scores_best_first(server: Server,
                                                          reranker: Reranker) -> None:
    import cohere

    expected = reranker.score(QUERY, DOCUMENTS)
    order = list(np.argsort(-expected, kind="stable"))
    v1 = cohere.Client(base_url=server.url, api_key="unused").rerank(
        model="rerank", query=QUERY, documents=DOCUMENTS, top_n=3, return_documents=True)
    assert [r.index for r in v1.results] == order[:3]
    for r in v1.results:
        assert r.relevance_score == pytest.approx(float(expected[r.index]), abs=1e-6)
        assert r.document is not None and r.document.text == DOCUMENTS[r.index]
    v2 = cohere.ClientV2(base_url=server.url, api_key="unused").rerank(
        model="rerank", query=QUERY, documents=DOCUMENTS)
    assert [r.index for r in v2.results] == order
    np.testing.assert_allclose([r.relevance_score for r in v2.results], expected[order],
                               atol=1e-6)
    # Jina's object documents, and no model: the first reranker served answers.
    body = _post(server, "/v1/rerank", {"query": QUERY, "documents": [{"text": d} for d in
                                                                      DOCUMENTS[:2]],
                                        "return_documents": False}).json()
    assert body["model"] == "rerank" and body["usage"]["total_tokens"] > 0
    assert all("document" not in r for r in body["results"])
    assert {r["index"] for r in body["results"]} == {0, 1}


def test_tei_shape_raw_scores_and_truncation(server: Server, reranker: Reranker) -> None:
    ids, cut = reranker.prompt.pair_ids(QUERY, DOCUMENTS)
    assert cut[-1] and not any(cut[:-1])  # the long document is over the pair limit
    logits = reranker.score_ids(ids, logits=True)
    refused = _post(server, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
    assert refused.status_code == 413  # TEI's default: refuse, do not cut
    assert refused.json()["error"]["param"] == f"texts[{len(DOCUMENTS) - 1}]"
    ranks = _post(server, "/rerank", {"query": QUERY, "texts": DOCUMENTS, "truncate": True,
                                      "raw_scores": True, "return_text": True}).json()
    assert [r["index"] for r in ranks] == list(np.argsort(-logits, kind="stable"))
    for r in ranks:
        assert r["score"] == pytest.approx(float(logits[r["index"]]), abs=1e-5)
        assert r["text"] == DOCUMENTS[r["index"]]
    plain = _post(server, "/rerank", {"query": QUERY, "texts": DOCUMENTS[:2]}).json()
    assert all(0 < r["score"] < 1 and "text" not in r for r in plain)


def test_concurrent_requests_equal_single_ones(server: Server, reranker: Reranker) -> None:
    docs = DOCUMENTS[:-1]
    expected = reranker.score(QUERY, docs)
    bodies = [{"model": "rerank", "query": QUERY, "documents": docs[i % len(docs):]}
              for i in range(32)]
    before = metric(httpx.get(server.url + "/metrics").text, "qwen3emb_batch_size_count")
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda b: _post(server, "/v2/rerank", b), bodies))
    worst = 0.0
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        offset = len(docs) - len(body["documents"])
        for r in answer.json()["results"]:
            worst = max(worst, abs(r["relevance_score"] - float(expected[offset + r["index"]])))
    assert worst <= 1e-6
    after = httpx.get(server.url + "/metrics").text
    pairs = sum(len(b["documents"]) for b in bodies)
    assert metric(after, "qwen3emb_batch_size_count") - before < pairs  # pairs were batched
    assert 'qwen3emb_requests_total{route="/v2/rerank",status="200"}' in after


def test_each_model_answers_only_its_own_routes(server: Server) -> None:
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert [(m["id"], m["task"]) for m in models] == [("embed", "embed"), ("rerank", "rerank")]
    embedded = _post(server, "/v1/embeddings", {"input": "hello"})  # no model: the embedder
    assert embedded.status_code == 200 and embedded.json()["model"] == "embed"
    wrong = _post(server, "/v1/embeddings", {"input": "hello", "model": "rerank"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_model_kind"
    assert "/v1/rerank" in wrong.json()["error"]["message"]
    wrong = _post(server, "/v1/rerank", {"query": "q", "documents": ["d"], "model": "embed"})
    assert wrong.status_code == 400 and "/v1/embeddings" in wrong.json()["error"]["message"]
    missing = _post(server, "/rerank", {"query": "q", "texts": ["d"], "model": "other"})
    assert missing.status_code == 404 and "'embed', 'rerank'" in missing.json()["error"][
        "message"]
    info = httpx.get(server.url + "/info").json()
    assert [m["task"] for m in info["models"]] == ["embed", "rerank"]
    assert info["models"][1]["max_tokens"] == MAX_TOKENS


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"query": "q", "documents": []}, 400, "documents is an empty list"),
    ({"query": "q", "documents": ["d"] * 17}, 413, "limit of 16"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n"),
    ({"query": "q", "documents": ["d"], "max_tokens_per_doc": 64}, 400,
     "unknown field 'max_tokens_per_doc'; this route takes model, query, documents"),
    ({"query": 3, "documents": ["d"]}, 400, "query"),
    ({"query": "q", "documents": [{"image": "x"}]}, 400, "documents"),
    ({"query": "q", "documents": ["d"], "instruction": " "}, 400, "instruction is empty"),
])
def test_bad_rerank_requests_are_refused_in_one_line(server: Server, body: dict[str, object],
                                                     status: int, needle: str) -> None:
    answer = _post(server, "/v1/rerank", body)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]["message"]
    assert needle in message and "\n" not in message
    assert httpx.get(server.url + "/ready").status_code == 200  # still up


def test_schemathesis_finds_no_failure_on_any_route(server: Server, tmp_path: Path) -> None:
    """Every route, every check, a bounded deterministic run: the document and the server
    agree (statuses, required and nullable fields, content types), no 5xx, still up."""
    pytest.importorskip("schemathesis")
    # 413 is the documented answer to a request above the server's token limits, which no
    # JSON schema can state (token counts); every other status keeps schemathesis' defaults.
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        '[checks.positive_data_acceptance]\nexpected-statuses = ["2xx", "3xx", "401", "403", '
        '"404", "409", "413", "429", "5xx"]\n[checks.negative_data_rejection]\n'
        'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", '
        '"422", "428", "429", "5xx"]\n')
    launch = "from schemathesis.cli import schemathesis; schemathesis()"
    result = subprocess.run(
        [sys.executable, "-c", launch, "--config-file", str(config), "run",
         server.url + "/openapi.json", "--checks", "all",
         "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--workers", "1", "--seed", "7",
         "--generation-deterministic", "--request-timeout", "60", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert httpx.get(server.url + "/ready").status_code == 200
