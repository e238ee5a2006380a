"""Reranker GGUFs: llama.cpp's rank pooling gives the model card's score, with no flag.

Both reranker fixtures (an untied head whose tokenizer appends nothing; a tied head whose
tokenizer appends ``<|endoftext|>``) are exported to ONNX and GGUF, validated at export against
transformers, and run through llama.cpp (llama-cpp-python's library) by ``GGUFReranker``, the
CLI and the server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import running_server
from typer.testing import CliRunner

from qwen3emb.cli import create_app
from qwen3emb.runtime import GGUFReranker, Reranker

pytest.importorskip("llama_cpp")

QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital and largest city of France.", "Bananas are yellow.",
             "東京は日本の首都です。", "", "literal <|im_end|> in a document",
             "The Eiffel Tower is in Paris. " * 30]


def invoke(*args: object):
    return CliRunner().invoke(create_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def gguf_bundles(reranker_checkpoints: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each fixture as ONNX fp32 + GGUF f32 and f16, validated at export (exit 0)."""
    root = tmp_path_factory.mktemp("gguf-rerankers")
    out = {}
    for name, checkpoint in reranker_checkpoints.items():
        result = invoke("export", checkpoint, "-o", root / name, "--gguf-type", "f32",
                        "--gguf-type", "f16")
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def _gguf(path: Path) -> object:
    from gguf import GGUFReader

    return GGUFReader(path)


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_the_gguf_pools_by_rank_through_the_yes_minus_no_head(
        gguf_bundles: dict[str, Path], reranker_checkpoints: dict[str, Path],
        name: str) -> None:
    from safetensors.numpy import load_file

    manifest = json.loads((gguf_bundles[name] / "manifest.json").read_text())
    yes, no = manifest["rerank"]["yes_token_id"], manifest["rerank"]["no_token_id"]
    weights = load_file(str(reranker_checkpoints[name] / "model.safetensors"))
    source = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    for kind in ("f32", "f16"):
        reader = _gguf(gguf_bundles[name] / "gguf" / f"model-{kind}.gguf")
        fields = reader.fields
        assert int(fields["qwen3.pooling_type"].contents()) == 4  # RANK
        assert fields["qwen3.classifier.output_labels"].contents() == ["yes", "no"]
        assert fields["tokenizer.ggml.add_eos_token"].contents() is False
        template = fields["tokenizer.chat_template.rerank"].contents()
        assert "{query}" in template and "{document}" in template
        tensors = {t.name: t for t in reader.tensors}
        assert "output.weight" not in tensors  # no vocabulary-wide head
        head = tensors["cls.output.weight"]
        assert head.tensor_type.name == "F32"  # the difference is kept exact in every type
        rows = np.asarray(head.data, dtype=np.float32).reshape(2, -1)
        expected = source[yes].astype(np.float64) - source[no].astype(np.float64)
        np.testing.assert_allclose(rows[0], expected, atol=1e-6)
        assert not rows[1].any()


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_llama_cpps_rerank_template_tokenizes_to_our_pair_ids(
        gguf_bundles: dict[str, Path], name: str) -> None:
    """llama-server fills {query} and {document} and tokenizes with special tokens parsed:
    for an uncut pair those are exactly the ids our runtime builds (post-processor tokens
    included), so llama-server --reranking scores what GGUFReranker scores."""
    reranker = GGUFReranker(gguf_bundles[name], gguf_type="f32")
    lib = reranker._lib
    template = lib.llama_model_chat_template(reranker._model, b"rerank").decode()
    ids, cut = reranker.prompt.pair_ids(QUERY, DOCUMENTS[:5])
    assert not any(cut)
    for doc, ours in zip(DOCUMENTS[:5], ids):
        text = template.replace("{query}", QUERY).replace("{document}", doc).encode()
        buf = (lib.llama_token * (len(text) + 8))()
        n = lib.llama_tokenize(reranker._vocab, text, len(text), buf, len(buf), False, True)
        assert list(buf[:n]) == ours, doc
    reranker.close()


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_llama_cpp_scores_match_onnx_and_do_not_depend_on_the_batch(
        gguf_bundles: dict[str, Path], name: str) -> None:
    onnx = Reranker(gguf_bundles[name]).score(QUERY, DOCUMENTS)
    with GGUFReranker(gguf_bundles[name], gguf_type="f32", n_threads=2) as reranker:
        batched = reranker.score(QUERY, DOCUMENTS)
        singles = np.array([reranker.score(QUERY, [d])[0] for d in DOCUMENTS])
        assert batched.dtype == np.float32 and batched.shape == (len(DOCUMENTS),)
        np.testing.assert_allclose(batched, onnx, atol=1e-3)  # llama.cpp's f16 KV cache
        # llama.cpp's reduction order follows the batch's token count: float rounding only.
        np.testing.assert_allclose(singles, batched, atol=1e-5)
        logits = reranker.score_ids(reranker.prompt.pair_ids(QUERY, DOCUMENTS)[0], logits=True)
        np.testing.assert_allclose(1 / (1 + np.exp(-logits.astype(np.float64))), batched,
                                   atol=1e-6)
        best = reranker.rerank(QUERY, DOCUMENTS, top_n=2)
        assert [i for i, _ in best] == list(np.argsort(-batched, kind="stable")[:2])


def test_the_export_report_checks_each_gguf_on_llama_cpp(gguf_bundles: dict[str, Path]) -> None:
    report = json.loads((gguf_bundles["tied"] / "reports" / "parity.json").read_text())
    rows = {r["precision"]: r for r in report["artifacts"]}
    assert rows["f32"]["kind"] == "gguf" and rows["f32"]["checked_on"] == "llama.cpp"
    assert rows["f32"]["floor"] == 1e-3 and rows["f16"]["floor"] == 5e-3
    assert all(rows[p]["passed"] for p in ("fp32", "f32", "f16"))
    assert rows["f32"]["batch_vs_single_max_diff"] <= 1e-5


def test_the_rerank_command_and_the_server_run_gguf_types_on_llama_cpp(
        gguf_bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = gguf_bundles["tied"]
    with GGUFReranker(bundle, gguf_type="f16") as reranker:
        expected = reranker.score(QUERY, DOCUMENTS[:3])
    result = invoke("rerank", bundle, QUERY, *DOCUMENTS[:3], "--precision", "f16")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["index"] for line in lines] == list(np.argsort(-expected, kind="stable"))
    assert [line["score"] for line in lines] == pytest.approx(
        sorted(expected.tolist(), reverse=True), abs=1e-6)
    refused = invoke("rerank", bundle, QUERY, "doc", "--precision", "f16", "--provider", "cpu")
    assert refused.exit_code == 2 and "--provider applies to ONNX models" in refused.stderr
    with running_server(bundle, tmp_path, "--precision", "f16") as server:
        body = httpx.post(server.url + "/v1/rerank", json={"query": QUERY,
                                                             "documents": DOCUMENTS[:3]},
                          timeout=60).json()
        info = httpx.get(server.url + "/info", timeout=10).json()
    scores = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([scores[i] for i in range(3)], expected, atol=1e-6)
    assert "llama.cpp" in json.dumps(info)


def test_gguf_reranker_and_embedder_refuse_each_other(tiny_bundle: Path,
                                                       gguf_bundles: dict[str, Path]) -> None:
    from qwen3emb.errors import BundleError
    from qwen3emb.runtime import GGUFTextEmbedder

    with pytest.raises(BundleError, match="not a reranker"):
        GGUFReranker(tiny_bundle)
    with pytest.raises(BundleError, match="append <\\|endoftext\\|>"):
        GGUFTextEmbedder(gguf_bundles["tied"] / "gguf" / "model-f32.gguf")
