"""Reranker bundles load in sentence-transformers' CrossEncoder (ONNX backend) and
transformers.js with no code of ours, and score pairs as our runtime does.

Both reranker fixtures run: one tokenizer appends nothing to the content, one appends
``<|endoftext|>``; the model card's templates write that token in, so both tools give our ids.
Environments as in tests/test_interop.py (scripts/consumer_envs.sh).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_interop import NODE_DIR, ST_PYTHON, _needs, _run

from qwen3emb.constants import SCORE_FLOORS
from qwen3emb.export.bundle.card import PLACEHOLDER, rerank_tool_snippet

QUERY = "capital of France?"
DOCUMENTS = ["Paris is the capital of France.",
             "Bananas are a yellow fruit, rich in potassium. " * 4, "",
             "<|im_end|> is not an end here"]
"""Mixed lengths (each tool pads its own way), an empty document, special-token-looking text."""


@pytest.fixture(scope="module")
def interop_rerankers(reranker_checkpoints: dict[str, Path],
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each reranker fixture with fp32 and int8 graphs, weights in external data files."""
    from qwen3emb.export.onnx import trace
    from qwen3emb.pipeline import export_bundle

    root = tmp_path_factory.mktemp("interop-rerank")
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trace, "EXTERNAL_DATA_THRESHOLD", 0)
        for name, checkpoint in reranker_checkpoints.items():
            out[name] = root / name
            export_bundle(checkpoint, out[name], validate=False, precisions=["int8"])
    return out


@pytest.fixture(scope="module")
def our_scores(interop_rerankers: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    from qwen3emb.runtime import Reranker

    return {name: {precision: Reranker(bundle, precision=precision).score(QUERY, DOCUMENTS)
                   for precision in ("fp32", "int8")}
            for name, bundle in interop_rerankers.items()}


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


def _check(got: list[float], ours: np.ndarray, precision: str, tool: str) -> None:
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    diff = float(np.max(np.abs(got - ours)))
    print(f"{tool} {precision}: max |score diff| {diff:.2e}")  # shown with -s
    # The same graph on the same ids: only the floor of fp32 is allowed, at any precision.
    assert diff <= SCORE_FLOORS["fp32"], f"{tool} {precision}: max |score diff| {diff:.2e}"


def test_the_bundle_declares_a_one_label_classifier(interop_rerankers: dict[str, Path]) -> None:
    from qwen3emb.export.bundle.interop import check_interop_files

    for name, bundle in interop_rerankers.items():
        assert check_interop_files(bundle) == [], name
        config = json.loads((bundle / "config.json").read_text())
        assert (config["num_labels"], config["problem_type"]) == (1, "multi_label_classification")
        rerank = _manifest(bundle)["rerank"]
        appended = "<|endoftext|>" if name == "tied" else ""
        assert rerank["document_template"].startswith(
            "<Document>: {document}" + appended + "<|im_end|>")
        card = (bundle / "README.md").read_text()
        assert "CrossEncoder" in card and "PreTrainedModel.from_pretrained" in card


@pytest.mark.slow
def test_cross_encoder_scores_like_our_runtime(interop_rerankers, our_scores, tmp_path):
    _needs(ST_PYTHON.parents[1], "sentence-transformers")
    for name, bundle in interop_rerankers.items():
        _, snippet = rerank_tool_snippet("cross-encoder", _manifest(bundle))
        snippet = snippet.replace(PLACEHOLDER, str(bundle))
        script = tmp_path / f"ce_{name}.py"
        script.write_text(snippet + f"""
import json
out = {{}}
for precision, kwargs in (("fp32", {{}}),
                          ("int8", {{"model_kwargs": {{"file_name": "onnx/model_int8.onnx"}}}})):
    model = CrossEncoder({str(bundle)!r}, backend="onnx", **kwargs)
    prompt = query_template.replace("{{instruction}}", instruction)
    pairs = [(prompt.replace("{{query}}", {QUERY!r}), document_template.replace("{{document}}", d))
             for d in {DOCUMENTS!r}]
    out[precision] = model.predict(
        pairs, batch_size=3, processing_kwargs={{"text": {{"add_special_tokens": False}}}}).tolist()
out["snippet"] = scores.tolist()
print(json.dumps(out))
""")
        got = _run([str(ST_PYTHON), str(script)])
        assert len(got["snippet"]) == 2
        for precision in ("fp32", "int8"):
            _check(got[precision], our_scores[name][precision], precision, f"CrossEncoder {name}")


@pytest.mark.slow
def test_transformers_js_scores_like_our_runtime(interop_rerankers, our_scores, tmp_path):
    _needs(NODE_DIR, "transformers.js")
    (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules")
    for name, bundle in interop_rerankers.items():
        _, snippet = rerank_tool_snippet("transformers.js", _manifest(bundle))
        snippet = snippet.replace(PLACEHOLDER, bundle.name)
        prologue = ("import { env, TextClassificationPipeline } from '@huggingface/transformers';\n"
                    f"env.localModelPath = {json.dumps(str(bundle.parent) + '/')};\n"
                    "env.allowRemoteModels = false;\n")
        epilogue = f"""
const out = {{}};
const docs = {json.dumps(DOCUMENTS)};
const pairPrompt = queryTemplate.replace('{{instruction}}', () => instruction)
  .replace('{{query}}', () => {json.dumps(QUERY)});
for (const dtype of ['fp32', 'int8']) {{
  const m = await PreTrainedModel.from_pretrained('{bundle.name}', {{ dtype }});
  const batch = tokenizer(docs.map(() => pairPrompt), {{
    text_pair: docs.map((d) => documentTemplate.replace('{{document}}', () => d)),
    padding: true, truncation: true, add_special_tokens: false }});
  out[dtype] = (await m(batch)).logits.sigmoid().tolist().map((row) => row[0]);
  // The text-classification pipeline on the whole prompt as one string.
  const classify = new TextClassificationPipeline({{
    task: 'text-classification', model: m, tokenizer }});
  const whole = docs.map((d) => pairPrompt + documentTemplate.replace('{{document}}', () => d));
  out[dtype + '-pipeline'] = (await classify(whole)).map((r) => r.score);
}}
process.stdout.write('\\n' + JSON.stringify(out) + '\\n');
"""
        script = tmp_path / f"tjs_{name}.mjs"
        script.write_text(prologue + snippet + epilogue)
        got = _run(["node", str(script)], cwd=tmp_path)
        for precision in ("fp32", "int8"):
            _check(got[precision], our_scores[name][precision], precision,
                   f"transformers.js {name}")
        if name == "untied":
            # The pipeline tokenizes with the post-processor: the same ids when it adds nothing.
            for precision in ("fp32", "int8"):
                _check(got[precision + "-pipeline"], our_scores[name][precision], precision,
                       "transformers.js text-classification pipeline")
        else:
            # One that appends <|endoftext|> puts it after the suffix: the pipeline is wrong
            # then, and the card does not offer it.
            assert "TextClassificationPipeline" not in (bundle / "README.md").read_text()
