"""Peer engines for ``scripts/bench.py --peers``: other runtimes on the same checkpoint.

- ``llama.cpp-q8_0``, ``llama.cpp-q4_k_m``: GGUFs written by our exporter
  (``qwen3emb.export.gguf.text.export_gguf``; q4_k_m through llama.cpp's own
  ``llama_model_quantize`` from an f32 GGUF), run by our llama.cpp runtime
  (``GGUFTextEmbedder.embed_ids``: pooling LAST, physical batch = context).
- ``genai-fp32``: the graph of onnxruntime-genai's model builder (``-p fp32 -e cpu
  --extra_options exclude_lm_head=true``), run with plain onnxruntime: right padding, empty
  (zero-length) past key/values, the hidden state at position length-1 of each row, L2.
- ``openvino-fp32``: OpenVINO compiling our own fp32 graph (``onnx/model.onnx``) for CPU.
- ``openvino-int8-wo``: that graph with NNCF's weight-only int8 (``compress_weights``,
  ``INT8_ASYM``, per channel), which OpenVINO's CPU plugin runs with activations quantized
  dynamically in groups (``DYNAMIC_QUANTIZATION_GROUP_SIZE``, 32 by default).
- ``openvino-int8-ptq``: NNCF's full int8 post-training quantization of that graph
  (``nncf.quantize``, ``ModelType.TRANSFORMER``, 64 random-token calibration rows).

Each peer runs with the same thread count as the other engines. A peer whose package is missing
or whose build fails is skipped with a one-line reason instead of stopping the benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

LLAMA_TYPES = ("q8_0", "q4_k_m")
OPENVINO_INT8 = ("openvino-int8-wo", "openvino-int8-ptq")
PEER_NAMES = (*(f"llama.cpp-{t}" for t in LLAMA_TYPES), "genai-fp32", "openvino-fp32",
              *OPENVINO_INT8)

Embed = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(input_ids, attention_mask) int64 [batch, seq], right-padded -> unit rows [batch, dim]."""


def _missing(module: str, package: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{package} is not installed (pip install 'qwen3emb-export[peers]')"
    return None


def _one_line(error: BaseException | str) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__


def build_peers(checkpoint: Path, onnx_fp32: Path, work: Path, tag: str, *,
                genai: bool = True) -> tuple[dict[str, Path], dict[str, str]]:
    """Write (or reuse, cached under ``work``) the artifact of every peer engine.

    Args:
        checkpoint: the Hugging Face checkpoint the bundle was exported from.
        onnx_fp32: the bundle's fp32 graph (OpenVINO compiles it).
        work: cache directory of the benchmark.
        tag: the checkpoint preset, part of the cache directory names.
        genai: build onnxruntime-genai's graph too.

    Returns:
        ``files``: peer name -> artifact path; ``skipped``: peer name -> one-line reason.
    """
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}

    reason = _missing("llama_cpp", "llama-cpp-python")
    gguf_dir = work / f"gguf-{tag}"
    if reason is None:
        wanted = [t for t in LLAMA_TYPES if not (gguf_dir / f"model-{t}.gguf").is_file()]
        try:
            if wanted:
                from qwen3emb.export.gguf.text import export_gguf

                logging.info("writing GGUF %s", ", ".join(wanted))
                export_gguf(checkpoint, gguf_dir, wanted)
        except Exception as e:  # noqa: BLE001 - reported as a skipped engine
            reason = f"GGUF export failed: {_one_line(e)}"
    for t in LLAMA_TYPES:
        if reason is None:
            files[f"llama.cpp-{t}"] = gguf_dir / f"model-{t}.gguf"
        else:
            skipped[f"llama.cpp-{t}"] = reason

    reason = _missing("onnxruntime_genai", "onnxruntime-genai")
    genai_dir = work / f"genai-fp32-{tag}"
    if reason is None and genai and not (genai_dir / "model.onnx").is_file():
        reason = build_genai(checkpoint, genai_dir, work / "genai-cache")
    if reason is None and genai:
        files["genai-fp32"] = genai_dir / "model.onnx"
    elif genai:
        skipped["genai-fp32"] = reason

    reason = _missing("openvino", "openvino")
    if reason is None:
        files["openvino-fp32"] = onnx_fp32
    else:
        skipped["openvino-fp32"] = reason
    nncf_reason = reason or _missing("nncf", "nncf")
    for name in OPENVINO_INT8:
        out = work / f"{name}-{tag}" / "model.xml"
        if nncf_reason is None and not out.is_file():
            try:
                build_openvino_int8(onnx_fp32, out, full=name.endswith("ptq"))
            except Exception as e:  # noqa: BLE001 - reported as a skipped engine
                skipped[name] = f"NNCF failed: {_one_line(e)}"
                continue
        if nncf_reason is None:
            files[name] = out
        else:
            skipped[name] = nncf_reason
    return files, skipped


def build_openvino_int8(onnx_fp32: Path, out: Path, *, full: bool) -> None:
    """NNCF int8 of our fp32 graph, saved as OpenVINO IR at ``out``: weight-only
    (``compress_weights``, ``INT8_ASYM``) or full post-training quantization."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(os.fspath(onnx_fp32))
    if full:
        rng = np.random.default_rng(0)
        rows = []
        for _ in range(64):
            length = int(rng.integers(8, 128))
            ids = rng.integers(0, 151643, (1, length), dtype=np.int64)
            ids[0, -1] = 151643
            rows.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        model = nncf.quantize(model, nncf.Dataset(rows), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(rows))
    else:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, os.fspath(out))


def build_genai(checkpoint: Path, out: Path, cache: Path) -> str | None:
    """Run onnxruntime-genai's model builder (fp32, CPU, no lm_head) in a subprocess.

    Returns:
        ``None`` on success, else the builder's last error line.
    """
    logging.info("building the onnxruntime-genai graph (model builder, fp32 cpu)")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
               os.fspath(checkpoint), "-o", os.fspath(out), "-p", "fp32", "-e", "cpu",
               "-c", os.fspath(cache), "--extra_options", "exclude_lm_head=true"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        return f"onnxruntime-genai model builder failed: {_one_line(done.stderr or done.stdout)}"
    return None


def load_peer(name: str, path: Path, threads: int) -> Embed:
    """Load one peer engine with ``threads`` compute threads.

    Raises:
        KeyError: ``name`` is not a peer.
        Exception: whatever the engine raises while loading (the caller reports it).
    """
    if name.startswith("llama.cpp-"):
        return _load_llama(path, threads)
    if name == "genai-fp32":
        return _load_genai(path, threads)
    if name == "openvino-fp32" or name in OPENVINO_INT8:
        return _load_openvino(path, threads)
    raise KeyError(f"unknown peer {name!r}; known: {', '.join(PEER_NAMES)}")


def _rows(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """The real tokens of each right-padded row."""
    return [row[:n].tolist() for row, n in zip(ids, mask.sum(axis=1))]


def _load_llama(path: Path, threads: int) -> Embed:
    from qwen3emb.runtime.gguf import GGUFTextEmbedder

    # Our runtime: one context with n_ctx = n_batch = n_ubatch, pooling LAST, L2.
    model = GGUFTextEmbedder(path, n_threads=threads)

    def embed(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return model.embed_ids(_rows(ids, mask))

    return embed


def _load_genai(path: Path, threads: int) -> Embed:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    config = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads, head = int(config["num_key_value_heads"]), int(config["head_size"])
    past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]

    def embed(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        empty = np.zeros((ids.shape[0], kv_heads, 0, head), dtype=np.float32)
        feeds = {"input_ids": ids, "attention_mask": mask, **{name: empty for name in past}}
        hidden = session.run(["hidden_states"], feeds)[0]
        last = mask.sum(axis=1) - 1  # right padding: the last real token
        vec = hidden[np.arange(len(ids)), last]
        return vec / np.linalg.norm(vec, axis=1, keepdims=True)

    return embed


def _load_openvino(path: Path, threads: int) -> Embed:
    import openvino as ov

    # Latency hint = one stream, like one onnxruntime session; f32 so that a CPU with bf16
    # support does not run the fp32 graph in bf16 (OpenVINO's default there).
    compiled = ov.Core().compile_model(os.fspath(path), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    output = compiled.output("sentence_embedding")

    def embed(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        request.infer({"input_ids": ids, "attention_mask": mask})
        return request.get_tensor(output).data.copy()

    embed.compiled = compiled  # type: ignore[attr-defined]  # outlives the request
    return embed
