"""The Hub model card (``README.md``) of a bundle: YAML metadata, files, parity table and one
usage snippet per tool that loads the bundle (docs/interop.md).

Written by the bundle writer, and again by :func:`qwen3emb.pipeline.record_parity` once the
validator has filled the parity table. Not hashed in the manifest: it is documentation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qwen3emb import __version__
from qwen3emb.constants import FLOORS, GGUF_DIR, MODEL_CARD_FILE
from qwen3emb.export.bundle.interop import TOOLS

PLACEHOLDER = "MODEL_ID"
"""Stands for the Hub repo id (or the bundle directory) in the snippets."""

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

QUERY = "What is the capital of China?"
DOCUMENT = "The capital of China is Beijing."

SNIPPETS: dict[str, tuple[str, str]] = {
    "sentence-transformers": ("python", f'''\
from sentence_transformers import SentenceTransformer

# int8: add model_kwargs={{"file_name": "onnx/model_int8.onnx"}} (fp16: model_fp16.onnx)
model = SentenceTransformer("{PLACEHOLDER}", backend="onnx")
queries = model.encode(["{QUERY}"], prompt_name="query")
documents = model.encode(["{DOCUMENT}"])
print(model.similarity(queries, documents))
'''),
    "fastembed": ("python", f'''\
from fastembed import TextEmbedding
from fastembed.common.model_description import ModelSource, PoolingType

TextEmbedding.add_custom_model(
    model="{PLACEHOLDER}", pooling=PoolingType.DISABLED, normalization=False,
    sources=ModelSource(hf="{PLACEHOLDER}"), dim=DIM, model_file="onnx/model.onnx",
    output_name="sentence_embedding")  # or onnx/model_int8.onnx, onnx/model_int4.onnx
model = TextEmbedding("{PLACEHOLDER}")  # a local bundle: add specific_model_path="BUNDLE_DIR"
task = "Given a web search query, retrieve relevant passages that answer the query"
queries = list(model.embed([f"Instruct: {{task}}\\nQuery:{QUERY}"]))
documents = list(model.embed(["{DOCUMENT}"]))
'''),
    "transformers.js": ("js", f'''\
import {{ pipeline }} from '@huggingface/transformers';

// dtype: 'fp32' (default here), 'fp16', 'int8'; int4: {{ model_file_name: 'model_int4' }}
const extractor = await pipeline('feature-extraction', '{PLACEHOLDER}', {{ dtype: 'fp32' }});
const task = 'Given a web search query, retrieve relevant passages that answer the query';
const options = {{ pooling: 'last_token', normalize: true }};
const queries = await extractor([`Instruct: ${{task}}\\nQuery:{QUERY}`], options);
const documents = await extractor(['{DOCUMENT}'], options);
console.log(queries.tolist(), documents.tolist());
'''),
    "tei": ("sh", f'''\
# A TEI build with the ONNX Runtime backend (it takes sentence_embedding as is; fp32 only)
text-embeddings-router --model-id {PLACEHOLDER} --port 8080
curl localhost:8080/embed -H 'Content-Type: application/json' \\
  -d '{{"inputs": "{DOCUMENT}"}}'
'''),
    "llama.cpp": ("sh", f'''\
# Pooling (last token) and the end token come from the GGUF: no --pooling flag.
# Raise the batch sizes to the longest input, or long inputs lose their end token.
llama-server -m {GGUF_DIR}/GGUF_FILE --embedding -c 8192 -b 8192 -ub 8192 --port 8081
# or: python -m llama_cpp.server --model {GGUF_DIR}/GGUF_FILE --embedding true \\
#       --n_ctx 8192 --n_batch 8192 --n_ubatch 8192 --port 8081
curl localhost:8081/v1/embeddings -H 'Content-Type: application/json' \\
  -d '{{"input": "{DOCUMENT}"}}'
'''),
    "ollama": ("sh", f'''\
ollama create qwen3-embedding -f {GGUF_DIR}/Modelfile
curl localhost:11434/api/embed -d '{{"model": "qwen3-embedding", "input": "{DOCUMENT}"}}'
'''),
}
"""One snippet per tool (tests/test_interop.py runs the Python and JavaScript ones against a
bundle, with ``MODEL_ID`` replaced)."""

NOT_RUN_HERE = ("tei", "ollama")
"""Tools whose files and fields are checked, but that the tests cannot run."""


def write_model_card(bundle: Path, manifest: dict[str, Any]) -> Path:
    """Render ``README.md`` from the manifest into ``bundle``.

    Returns:
        The card's path.
    """
    path = bundle / MODEL_CARD_FILE
    path.write_text(render_model_card(manifest), encoding="utf-8")
    return path


RERANK_SNIPPET = f'''\
from qwen3emb.runtime import Reranker  # numpy, onnxruntime and tokenizers; no torch

reranker = Reranker("{PLACEHOLDER}")  # a bundle directory; precision="fp16" for model_fp16.onnx
documents = ["{DOCUMENT}", "The capital of France is Paris."]
print(reranker.score("{QUERY}", documents))          # one score in (0, 1) per document
print(reranker.rerank("{QUERY}", documents, top_n=1))  # [(index, score)], best first
'''


VL_RERANK_SNIPPET = f'''\
from qwen3emb.runtime import VLReranker  # numpy, onnxruntime, tokenizers, Pillow; no torch

reranker = VLReranker("{PLACEHOLDER}")  # precision="fp16" / "int8" for decoder_fp16/int8.onnx
documents = [{{"image": "sofa.jpg"}}, "{DOCUMENT}", {{"text": "a clip", "video": "clip.mp4"}}]
print(reranker.score("a red sofa", documents))            # one score in (0, 1) per document
print(reranker.rerank({{"image": "query.png"}}, documents))  # [(index, score)], best first
'''


RERANK_TOOL_SNIPPETS: dict[str, tuple[str, str]] = {
    "cross-encoder": ("python", f'''\
from sentence_transformers import CrossEncoder

# int8: add model_kwargs={{"file_name": "onnx/model_int8.onnx"}} (fp16: model_fp16.onnx)
model = CrossEncoder("{PLACEHOLDER}", backend="onnx")
query_template = QUERY_TEMPLATE
document_template = DOCUMENT_TEMPLATE
instruction = INSTRUCTION
query, documents = "{QUERY}", ["{DOCUMENT}", "The capital of France is Paris."]
pairs = [(query_template.replace("{{instruction}}", instruction).replace("{{query}}", query),
          document_template.replace("{{document}}", document)) for document in documents]
# The templates hold every special token of the prompt: add none.
scores = model.predict(pairs, processing_kwargs={{"text": {{"add_special_tokens": False}}}})
print(scores)  # sigmoid of the graph's logits: the score of our Reranker
'''),
    "transformers.js": ("js", f'''\
import {{ AutoTokenizer, PreTrainedModel }} from '@huggingface/transformers';

// transformers.js maps no Qwen3 model to text classification: load the graph as is.
const tokenizer = await AutoTokenizer.from_pretrained('{PLACEHOLDER}');
// dtype: 'fp32', 'fp16' or 'int8' (model_fp16.onnx, model_int8.onnx)
const model = await PreTrainedModel.from_pretrained('{PLACEHOLDER}', {{ dtype: 'fp32' }});
const queryTemplate = QUERY_TEMPLATE;
const documentTemplate = DOCUMENT_TEMPLATE;
const instruction = INSTRUCTION;
const query = '{QUERY}';
const documents = ['{DOCUMENT}', 'The capital of France is Paris.'];
const prompt = queryTemplate.replace('{{instruction}}', () => instruction)
  .replace('{{query}}', () => query);
// The templates hold every special token of the prompt: add none.
const inputs = tokenizer(documents.map(() => prompt), {{
  text_pair: documents.map((d) => documentTemplate.replace('{{document}}', () => d)),
  padding: true, truncation: true, add_special_tokens: false }});
const {{ logits }} = await model(inputs);
console.log(logits.sigmoid().tolist());  // the score of our Reranker
'''),
}
"""How sentence-transformers and transformers.js score pairs with a reranker bundle; the
templates come from the manifest (tests/test_interop_rerank.py runs both)."""


def rerank_tool_snippet(tool: str, manifest: dict[str, Any]) -> tuple[str, str]:
    """The language and code of ``tool``'s reranker snippet, templates filled in from
    ``manifest["rerank"]``."""
    import json

    rerank = manifest["rerank"]
    language, code = RERANK_TOOL_SNIPPETS[tool]
    for key, value in (("QUERY_TEMPLATE", rerank["query_template"]),
                       ("DOCUMENT_TEMPLATE", rerank["document_template"]),
                       ("INSTRUCTION", rerank["default_instruction"])):
        code = code.replace(key, json.dumps(value, ensure_ascii=False))
    return language, code


def render_model_card(manifest: dict[str, Any]) -> str:
    """The model card's Markdown, YAML front matter first."""
    if manifest.get("task") == "rerank":
        return _render_reranker_card(manifest)
    tools = list(manifest.get("interop", {}).get("tools", []))
    artifacts = manifest["artifacts"]
    models = [a for a in artifacts if a.get("role") == "model"]
    has_gguf = any(a.get("kind") == "gguf" for a in models)
    has_onnx = any(a.get("kind") == "onnx" for a in models)
    source = str(manifest["source"]["model"])
    tags = ["qwen3emb-export", manifest["family"], "embeddings"]
    tags += ["onnx"] * has_onnx + ["gguf"] * has_gguf
    tags += [t if t != "tei" else "text-embeddings-inference" for t in tools
             if t in ("sentence-transformers", "transformers.js", "tei")]
    library = "sentence-transformers" if "sentence-transformers" in tools else "onnx"
    front = ["---", f"library_name: {library}", "pipeline_tag: feature-extraction"]
    if HUB_ID.match(source):
        front.append(f"base_model: {source}")
    front.append("tags:")
    front += [f"- {t}" for t in dict.fromkeys(tags)]
    front.append("---")
    embedding = manifest.get("embedding", {})
    version = manifest.get("versions", {}).get("qwen3emb-export", __version__)
    lines = [*front, "",
             f"# {Path(source).name or source} (ONNX / GGUF embedding bundle)", "",
             f"Exported by qwen3emb-export {version} "
             f"from `{source}`. Family `{manifest['family']}`; "
             f"{embedding.get('output_dim', '?')}-dimensional embeddings, "
             f"{embedding.get('pooling', 'last_token')} pooling and "
             f"{embedding.get('normalization', 'l2')} normalization inside the graphs; "
             f"inputs up to {manifest.get('tokenizer', {}).get('max_length', '?')} tokens.", ""]
    prompt = manifest.get("prompt", {})
    if prompt.get("query_template"):
        lines += ["Queries take an instruction, documents none: "
                  f"`{prompt['query_template']!r}` with the default task "
                  f"`{prompt.get('default_task', '')}`.", ""]
    lines += ["## Files", "", "| file | format | precision | MB |", "|---|---|---|---|"]
    lines += [f"| `{a['path']}` | {a['kind']} | {a.get('precision', '')} | "
              f"{a['size'] / 1e6:.1f} |" for a in models]
    lines += ["", *_parity_lines(manifest), ""]
    lines += ["## Use it from…", "",
              f"Replace `{PLACEHOLDER}` with this repository's id (or the bundle directory).", ""]
    gguf_files = [Path(a["path"]).name for a in models if a.get("kind") == "gguf"]
    for tool in tools:
        if tool not in SNIPPETS or (tool in ("llama.cpp", "ollama") and not has_gguf):
            continue
        language, code = SNIPPETS[tool]
        code = code.replace("DIM", str(embedding.get("output_dim", "DIM")))
        if gguf_files:
            code = code.replace("GGUF_FILE", gguf_files[0])
        note = " (files and fields checked; not run by the tests)" if tool in NOT_RUN_HERE else ""
        lines += [f"### {TOOLS[tool]}{note}", "", f"```{language}", code.rstrip(), "```", ""]
    missing = [name for key, name in TOOLS.items() if key not in tools]
    if missing:
        lines += ["## Not supported", "",
                  f"This `{manifest['family']}` bundle has no files for: {', '.join(missing)}. "
                  "Use qwen3emb's runtime (`pip install qwen3emb-export`) instead.", ""]
    return "\n".join(lines)


def _render_reranker_card(manifest: dict[str, Any]) -> str:
    from qwen3emb.constants import SCORE_FLOORS

    models = [a for a in manifest["artifacts"] if a.get("role") in ("model", "vision")]
    vl = "vision" in manifest
    source = str(manifest["source"]["model"])
    version = manifest.get("versions", {}).get("qwen3emb-export", __version__)
    front = ["---", "library_name: onnx", "pipeline_tag: text-ranking"]
    if HUB_ID.match(source):
        front.append(f"base_model: {source}")
    kinds = [k for k in ("onnx", "gguf") if any(a["kind"] == k for a in models)]
    front += ["tags:", "- qwen3emb-export", f"- {manifest['family']}", "- reranker",
              *(f"- {k}" for k in kinds), "---"]
    rerank = manifest.get("rerank", {})
    what = " and ".join(k.upper() for k in kinds)
    lines = [*front, "", f"# {Path(source).name or source} ({what} reranker bundle)", "",
             f"Exported by qwen3emb-export {version} from `{source}`. The graph takes the model "
             "card's prompt for a (query, document) pair and outputs `score` "
             "= sigmoid(logit(\"yes\") - logit(\"no\")) at the last real token (any padding "
             "side) and `logits`, the difference before the sigmoid; inputs up to "
             f"{manifest.get('tokenizer', {}).get('max_length', '?')} tokens, prompt included"
             + (" but for its last five." if vl else "."),
             "", *_pair_lines(rerank, vl), "", "## Files", "",
             "| file | format | precision | MB |", "|---|---|---|---|"]
    lines += [f"| `{a['path']}` | {a['kind']} | {a.get('precision', '')} | "
              f"{a['size'] / 1e6:.1f} |" for a in models]
    parity = manifest.get("parity", {})
    lines += ["", "## Parity with the reference", ""]
    if parity.get("status", "not-run") == "not-run":
        lines.append("Not validated at export (`--no-validate`).")
    else:
        lines += [f"Largest |score difference| to the HuggingFace reference "
                  f"({parity.get('reference_precision')}) over the validator's query/document "
                  f"pairs: **{parity['status']}**.", "",
                  "| artifact | max abs score diff | floor |", "|---|---|---|"]
        precision_of = {a["path"]: a.get("precision") for a in manifest["artifacts"]}
        for key, value in parity.get("max_abs_score_diff", {}).items():
            floor = SCORE_FLOORS.get(precision_of.get(key) or key)
            lines.append(f"| {key} | {value:.2e} | {'' if floor is None else floor} |")
    lines += ["", "## Use it", "", "```python",
              (VL_RERANK_SNIPPET if vl else RERANK_SNIPPET).rstrip(), "```", "", "```sh",
              *([f"qwen3emb-export rerank {PLACEHOLDER} \"a red sofa\" --documents docs.jsonl "
                 "--query-image query.png  # lines: \"text\" or {\"text\", \"image\", "
                 "\"video\"}"] if vl else
                [f"qwen3emb-export rerank {PLACEHOLDER} \"{QUERY}\" \"{DOCUMENT}\" "
                 "\"The capital of France is Paris.\""]), "```", ""]
    tools = manifest.get("interop", {}).get("tools", [])
    if "onnx" in kinds and "query_template" in rerank:
        for tool in (t for t in RERANK_TOOL_SNIPPETS if t in tools):
            language, code = rerank_tool_snippet(tool, manifest)
            lines += [f"## {TOOLS[tool]}", "", f"```{language}", code.rstrip(), "```", ""]
        if not manifest.get("tokenizer", {}).get("content_appended_ids"):
            lines += ["transformers.js' text-classification pipeline gives the same scores on the "
                      "whole prompt as one string, as this tokenizer adds nothing to it "
                      "(`pipeline()` has no Qwen3 classifier: `new TextClassificationPipeline("
                      "{ task: 'text-classification', model, tokenizer })`).", ""]
        lines += ["Both give our scores for pairs within the bundle's max_length; a longer pair "
                  "is cut at its end (the suffix with it) by these tools, not in the content "
                  "as the model card does: keep pairs under it there, or use `Reranker`.", ""]
    ggufs = [a for a in models if a["kind"] == "gguf"]
    if ggufs:
        lines += _llama_rerank_lines(ggufs[0]["path"])
    return "\n".join(lines)


def _pair_lines(rerank: dict[str, Any], vl: bool) -> list[str]:
    """How a pair is written: the model card's text template, or the released Qwen3-VL
    reranker's user turn."""
    if not vl:
        return [f"Pair content: `{rerank.get('template', '')!r}` with the default instruction "
                f"`{rerank.get('default_instruction', '')}`, between the system prefix and the "
                "assistant suffix of the model card (in `manifest.json`)."]
    turn = (rerank.get("instruction_prefix", "") + "{instruction}"
            + rerank.get("query_prefix", "") + "{query}" + rerank.get("document_prefix", "")
            + "{document}")
    return [f"Prompt: the released `Qwen3VLReranker`'s. System message "
            f"`{rerank.get('system', '')}`; one user turn `{turn!r}`, each side its videos, "
            "images and text in that order (`NULL` when it has none); default instruction "
            f"`{rerank.get('default_instruction', '')}`. All but the prompt's last "
            f"{rerank.get('tail_tokens', 5)} tokens is cut to the max length keeping every "
            "special token, so images and videos are never cut. Images and videos are "
            "preprocessed on the host as by the released code (`vision` in `manifest.json`)."]


def _llama_rerank_lines(path: str) -> list[str]:
    """How llama.cpp reads a reranker GGUF: rank pooling and the ``rerank`` template are in
    its metadata, so no flag but ``--reranking`` is needed."""
    return [
        "## llama.cpp", "",
        f"`{path}` pools by rank (`qwen3.pooling_type` 4) through a two-output head whose first "
        "output, after llama.cpp's softmax, is the score above; the model card's prompt, with "
        "the default instruction, is its `rerank` chat template.", "",
        "```sh", f"llama-server -m {PLACEHOLDER}/{path} --reranking", "",
        "curl localhost:8080/v1/rerank -d '{\"query\": \"" + QUERY + "\", "
        "\"documents\": [\"" + DOCUMENT + "\"]}'", "```", "",
        "```python",
        "from qwen3emb.runtime import GGUFReranker  # llama-cpp-python's library, no torch",
        "", f"reranker = GGUFReranker(\"{PLACEHOLDER}\")  # gguf_type=\"q8_0\" for another file",
        f"print(reranker.score(\"{QUERY}\", [\"{DOCUMENT}\"]))", "```", "",
        "llama-cpp-python's `Llama.embed()` is not a way to call it: it tokenizes without "
        "special tokens and reads `n_embd` floats of a two-float output.", ""]


def _parity_lines(manifest: dict[str, Any]) -> list[str]:
    parity = manifest.get("parity", {})
    status = parity.get("status", "not-run")
    lines = ["## Parity with the reference", ""]
    if status == "not-run":
        return lines + ["Not validated at export (`--no-validate`)."]
    lines += [f"Minimum cosine to the HuggingFace reference ({parity.get('reference_precision')}) "
              f"over the validator's probe set: **{status}**.", "",
              "| artifact | min cosine | floor |", "|---|---|---|"]
    precision_of = {a["path"]: a.get("precision") for a in manifest["artifacts"]}
    for key, value in parity.get("min_cosine", {}).items():
        floor = FLOORS.get(precision_of.get(key) or key)
        lines.append(f"| {key} | {value:.6f} | {'' if floor is None else floor} |")
    return lines
