"""Files that let other tools load a bundle from its directory with no code of ours
(docs/interop.md): sentence-transformers (ONNX backend), transformers.js, fastembed,
Text Embeddings Inference, llama.cpp and Ollama.

What each reads, from their loaders:

- sentence-transformers: ``modules.json`` (Transformer → Pooling → Normalize),
  ``sentence_bert_config.json``, ``1_Pooling/config.json``, ``config_sentence_transformers.json``
  (prompts), ``config.json`` (optimum builds its config from it) and ``onnx/model.onnx``'s
  ``last_hidden_state`` output.
- transformers.js: ``config.json`` (``model_type``, and ``transformers.js_config``: default dtype,
  external data), ``tokenizer.json`` / ``tokenizer_config.json``, ``onnx/model{suffix}.onnx``.
- TEI (ONNX backend): ``config.json`` (``architectures``, ``model_type``,
  ``max_position_embeddings``), ``1_Pooling/config.json``, ``onnx/model.onnx``'s
  ``sentence_embedding``.
- Ollama: ``gguf/Modelfile``.
- Rerankers, sentence-transformers' CrossEncoder (ONNX backend) and transformers.js:
  ``config.json`` as a one-label sequence classifier (``num_labels``, ``problem_type``
  ``multi_label_classification`` for transformers.js' sigmoid, ``sentence_transformers``'
  activation) and ``onnx/model.onnx``'s ``logits``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from qwen3emb.constants import (
    EXTERNAL_DATA_SUFFIX,
    GGUF_DIR,
    MODEL_CARD_FILE,
    ONNX_DIR,
    SENTENCE_EMBEDDING,
)
from qwen3emb.convert import Family
from qwen3emb.manifest import file_entry

logger = logging.getLogger(__name__)

TOOLS: dict[str, str] = {
    "sentence-transformers": "sentence-transformers (ONNX backend)",
    "transformers.js": "transformers.js",
    "fastembed": "fastembed",
    "tei": "Text Embeddings Inference (ONNX backend)",
    "llama.cpp": "llama.cpp (llama-server, llama-cpp-python)",
    "ollama": "Ollama",
    "cross-encoder": "sentence-transformers CrossEncoder (ONNX backend)",
}
"""Keys of :attr:`Family.interop_tools` and how the model card names them."""

TRANSFORMERS_JS_DTYPES: dict[str, str] = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}
"""Our precision → transformers.js ``dtype`` whose file suffix (``""``, ``_fp16``, ``_int8``)
is our file name. Our int4 file (``model_int4.onnx``) has no transformers.js suffix: load it
with ``model_file_name: 'model_int4'``."""

MODELFILE_PREFERENCE = ("f16", "bf16", "q8_0", "f32")
"""Which GGUF ``gguf/Modelfile`` points at when the bundle has several."""

POOLING_FILE = "1_Pooling/config.json"

CONFIG_TOOLS = frozenset({"sentence-transformers", "transformers.js", "tei", "fastembed",
                          "cross-encoder"})
"""Tools that read ``config.json``."""


def write_interop_files(family: Family, stage: Path, manifest: dict[str, Any],
                        artifacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write the loader files of the family's :attr:`Family.interop_tools` into ``stage``.

    Args:
        family: the checkpoint's family.
        stage: the staged bundle (models already written).
        manifest: the manifest so far (``embedding``, ``tokenizer`` sections).
        artifacts: the bundle's model entries (ONNX and GGUF), to know which files exist.

    Returns:
        Manifest entries of the written files (role ``interop``).
    """
    tools = set(family.interop_tools)
    onnx_models = {a["precision"]: a for a in artifacts
                   if a.get("kind") == "onnx" and a.get("role") == "model"}
    ggufs = [a for a in artifacts if a.get("kind") == "gguf" and a.get("role") == "model"]
    files: dict[str, Any] = {}
    if onnx_models and tools & CONFIG_TOOLS:
        files["config.json"] = loader_config(family, onnx_models, artifacts)
    if onnx_models and tools & {"sentence-transformers", "tei"}:
        files.update(sentence_transformers_files(family, manifest))
    if ggufs and "ollama" in tools:
        files[f"{GGUF_DIR}/Modelfile"] = modelfile(ggufs, int(manifest["tokenizer"]["max_length"]))
    entries = []
    for name, content in files.items():
        path = stage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
        path.write_text(text, encoding="utf-8")
        # The Modelfile belongs to the GGUF files it names; the rest to the ONNX graphs'
        # loaders. Role "interop" keeps them out of Manifest.models().
        kind = "gguf" if name.startswith(f"{GGUF_DIR}/") else "interop"
        entries.append(file_entry(stage, path, kind=kind, role="interop"))
    if "sentence-transformers" in tools and onnx_models:
        # Normalize has no configuration; sentence-transformers only needs the folder name.
        (stage / "2_Normalize").mkdir(exist_ok=True)
    manifest["interop"] = {"tools": [t for t in TOOLS if t in tools],
                           "model_card": MODEL_CARD_FILE}
    logger.info("wrote loader files for %s", ", ".join(sorted(tools)) or "no other tool")
    return entries


def loader_config(family: Family, onnx_models: dict[str, dict[str, Any]],
                  artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """``config.json``: the checkpoint's configuration plus ``transformers.js_config``.

    transformers.js defaults to the ``q8`` file (``model_quantized.onnx``) in browsers; the
    default dtype here is fp32, the file every bundle has. External weights are declared per
    file (transformers.js fetches ``<file>_data`` only when told).
    """
    config = family.loader_config()
    external = sorted({Path(a["path"]).name[: -len(EXTERNAL_DATA_SUFFIX)]
                       for a in artifacts if a.get("role") == "external-data"
                       and a["path"].startswith(f"{ONNX_DIR}/")})
    js: dict[str, Any] = {"dtype": "fp32"}
    if external:
        js["use_external_data_format"] = {name: 1 for name in external}
    config["transformers.js_config"] = js
    return config


def sentence_transformers_files(family: Family, manifest: dict[str, Any]) -> dict[str, Any]:
    """``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json`` and
    ``config_sentence_transformers.json``.

    The graph's ``last_hidden_state`` repeats the finished embedding at every position, so the
    declared last-token pooling and normalization return it unchanged; they are declared as the
    model computes them so that TEI (which reads the pooling, then takes
    ``sentence_embedding``) and readers of the card see the real recipe.
    """
    embedding = manifest["embedding"]
    pooling = {
        "word_embedding_dimension": int(embedding["output_dim"]),
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    }
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]
    st_config = {
        "model_type": "SentenceTransformer",
        "prompts": family.prompts(),
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    return {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": int(manifest["tokenizer"]["max_length"]),
                                      "do_lower_case": False},
        POOLING_FILE: pooling,
        "config_sentence_transformers.json": st_config,
    }


def modelfile(ggufs: list[dict[str, Any]], max_length: int) -> str:
    """``gguf/Modelfile`` for ``ollama create NAME -f gguf/Modelfile`` (paths relative to it).

    Ollama treats the model as an embedding model because the GGUF carries
    ``<arch>.pooling_type``; the context is the bundle's longest input.
    """
    by_type = {a["precision"]: Path(a["path"]).name for a in ggufs}
    chosen = next((by_type[t] for t in MODELFILE_PREFERENCE if t in by_type),
                  Path(ggufs[0]["path"]).name)
    others = [name for name in by_type.values() if name != chosen]
    lines = ["# ollama create NAME -f gguf/Modelfile   then   ollama embed / POST /api/embed",
             f"FROM ./{chosen}"]
    lines += [f"# FROM ./{name}" for name in others]
    lines.append(f"PARAMETER num_ctx {max_length}")
    return "\n".join(lines) + "\n"


def check_interop_files(bundle: Path) -> list[str]:
    """What a bundle lacks for the tools its manifest names (empty when nothing is missing).

    Checks the files and fields each loader reads (module docstring), including the ones
    of tools that cannot run here (TEI, Ollama).
    """
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    tools = set(manifest.get("interop", {}).get("tools", []))
    problems: list[str] = []

    def read(name: str) -> Any:
        path = bundle / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    if tools & CONFIG_TOOLS:
        config = read("config.json") or {}
        for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers",
                    "max_position_embeddings", "transformers.js_config"):
            if key not in config:
                problems.append(f"config.json has no {key}")
        if not (bundle / ONNX_DIR / "model.onnx").is_file():
            problems.append(f"{ONNX_DIR}/model.onnx is missing")
        outputs = [o["name"] for o in manifest.get("onnx", {}).get("outputs", [])]
        if manifest.get("task") == "rerank":
            if "logits" not in outputs:
                problems.append(f"the graph has no logits output ({outputs})")
            if (config.get("num_labels"), config.get("problem_type")) != (
                    1, "multi_label_classification"):
                problems.append("config.json is not a one-label multi_label_classification "
                                "classifier")
        elif outputs[:1] != [SENTENCE_EMBEDDING]:
            problems.append(f"the first graph output is {outputs[:1]}, not {SENTENCE_EMBEDDING}")
    if tools & {"sentence-transformers", "tei"}:
        pooling = read(POOLING_FILE) or {}
        if not pooling.get("pooling_mode_lasttoken"):
            problems.append(f"{POOLING_FILE} does not declare pooling_mode_lasttoken")
        read("modules.json")
        prompts = (read("config_sentence_transformers.json") or {}).get("prompts", {})
        if set(prompts) != {"query", "document"}:
            problems.append("config_sentence_transformers.json lacks the query/document prompts")
    if "ollama" in tools and any(a.get("kind") == "gguf" for a in manifest["artifacts"]):
        path = bundle / GGUF_DIR / "Modelfile"
        if not path.is_file():
            problems.append(f"{GGUF_DIR}/Modelfile is missing")
        else:
            sources = [line.split(None, 1)[1] for line in path.read_text().splitlines()
                       if line.startswith("FROM ")]
            if len(sources) != 1 or not (path.parent / sources[0]).is_file():
                problems.append(f"{GGUF_DIR}/Modelfile's FROM {sources} is not a file beside it")
    return problems
