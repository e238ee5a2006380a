"""Write every requested precision of a bundle's ONNX model: fp32 (reference), fp16, int8, int4."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import ATTENTION_MASK, INPUT_IDS
from qwen3emb.errors import InputError
from qwen3emb.export import quantize as q
from qwen3emb.export.spec import TextGraphSpec
from qwen3emb.manifest import file_entry

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
EXTERNAL_DATA_THRESHOLD = 1 << 30
CALIBRATION_TEXTS = 32
"""Texts of the built-in corpus used to find outlier channels (a few hundred tokens)."""


def check_precisions(precisions: Iterable[str] | None, int8_scheme: str | None = None
                     ) -> list[str]:
    """Normalize the requested precisions: fp32 always first, no repeats, in a fixed order.

    Raises:
        InputError: an unknown precision or int8 scheme, listing the supported values.
    """
    wanted = set(precisions or ())
    unknown = sorted(wanted - set(PRECISIONS))
    if unknown:
        raise InputError(f"unknown precision {', '.join(repr(p) for p in unknown)}",
                         hint=f"Supported: {', '.join(PRECISIONS)}")
    if int8_scheme is not None:
        q.check_int8_scheme(int8_scheme)
    return [p for p in PRECISIONS if p == "fp32" or p in wanted]


def calibration_feeds(tokenizer_json: Path, texts: Sequence[str] | None = None
                      ) -> list[dict[str, np.ndarray]]:
    """One unpadded feed per calibration text, tokenized with the bundle's tokenizer."""
    from tokenizers import Tokenizer

    from qwen3emb.convert._corpus import CORPUS

    tokenizer = Tokenizer.from_file(os.fspath(tokenizer_json))
    tokenizer.enable_truncation(max_length=128)
    feeds = []
    for text in list(texts or CORPUS)[:CALIBRATION_TEXTS]:
        ids = np.asarray([tokenizer.encode(text).ids], dtype=np.int64)
        feeds.append({INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids)})
    return feeds


def _total_bytes(model: Any) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def build_precisions(stage: Path, raw_path: Path, spec: TextGraphSpec, precisions: Sequence[str],
                     *, int8_scheme: str = q.DEFAULT_INT8_SCHEME,
                     tokenizer_json: Path) -> list[dict[str, Any]]:
    """Optimize the exported fp32 graph and write each requested precision into ``stage``.

    Args:
        stage: the staged bundle directory.
        raw_path: the exporter's fp32 ``model.onnx`` (replaced by its optimized form).
        spec: the graph contract every variant must keep.
        precisions: from :func:`check_precisions`.
        int8_scheme: one of ``quantize.INT8_SCHEMES``.
        tokenizer_json: the checkpoint tokenizer, for calibration texts.

    Returns:
        Manifest artifact entries (models and their external data files).

    Raises:
        OutputError: a converter or quantizer failed, or a graph breaks the contract.
    """
    import onnx

    from qwen3emb.export.onnx import check_graph_contract
    from qwen3emb.export.optimize import optimize_graph

    data_path = raw_path.with_name(raw_path.name + ".data")
    streamed = data_path.exists()
    # The rewrite needs the graph, not the weights: streamed weights stay on disk.
    model = onnx.load(os.fspath(raw_path), load_external_data=False)
    stats = optimize_graph(model)
    big = streamed or _total_bytes(model) > EXTERNAL_DATA_THRESHOLD
    entries: list[dict[str, Any]] = []

    def write(variant: Any, precision: str, scheme: str, settings: dict[str, Any]) -> None:
        name = "model.onnx" if precision == "fp32" else f"model_{precision}.onnx"
        path = raw_path.with_name(name)
        files = _save(variant, path, big)
        check_graph_contract(path, spec, schema_check=False)
        entries.append(file_entry(stage, files[0], kind="onnx", role="model",
                                  precision=precision, scheme=scheme, settings=settings))
        for extra in files[1:]:
            entries.append(file_entry(stage, extra, kind="onnx", role="external-data",
                                      precision=precision))
        logger.info("wrote %s (%s)", path.name, scheme)

    fp32_scheme = "fp32 weights and activations; RMSNorm and residual Adds fused"
    if streamed:
        # Only the graph changed; model.onnx.data is already what the streaming writer wrote.
        onnx.save_model(model, os.fspath(raw_path))
        check_graph_contract(raw_path, spec, schema_check=False)
        entries.append(file_entry(stage, raw_path, kind="onnx", role="model", precision="fp32",
                                  scheme=fp32_scheme, settings={"fusions": stats.to_dict()}))
        entries.append(file_entry(stage, data_path, kind="onnx", role="external-data",
                                  precision="fp32"))
        if set(precisions) <= {"fp32"}:
            return entries
        # The variants below are built in memory (streaming them is not done yet).
        onnx.load_external_data_for_model(model, os.fspath(raw_path.parent))
    else:
        raw_path.unlink()
        write(model, "fp32", fp32_scheme, {"fusions": stats.to_dict()})
    ranges = None
    if "int8" in precisions or "int4" in precisions:
        ranges = q.calibrate(model, calibration_feeds(tokenizer_json), workdir=stage)
    if "fp16" in precisions:
        from qwen3emb.export.fp16 import FP32_OPS, SCHEME, convert_fp16

        write(convert_fp16(model), "fp16", SCHEME, {"fp32_ops": list(FP32_OPS)})
    with tempfile.TemporaryDirectory(dir=stage) as tmp:
        if "int8" in precisions:
            variant, settings = int8_variant(model, dict(ranges or {}), int8_scheme, Path(tmp))
            write(variant, "int8", q.INT8_SCHEMES[int8_scheme], settings)
        if "int4" in precisions:
            variant, settings = int4_variant(model, dict(ranges or {}), workdir=Path(tmp))
            write(variant, "int4", INT4_SCHEME, settings)
    return entries


def _save(model: Any, path: Path, big: bool) -> list[Path]:
    import onnx

    if big:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, os.fspath(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
        # Saving moved the weights out of ``model``; the other variants still need them.
        onnx.load_external_data_for_model(model, os.fspath(path.parent))
        return [path, data]
    onnx.save_model(model, os.fspath(path))
    return [path]


def _copy(model: Any) -> Any:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def int8_variant(model: Any, ranges: dict[str, np.ndarray], scheme: str, workdir: Path
                 ) -> tuple[Any, dict[str, Any]]:
    """Build the int8 graph for ``scheme`` (see ``quantize.INT8_SCHEMES``)."""
    if scheme != q.NAIVE_INT8_SCHEME:  # the naive scheme is internal, for tests only
        q.check_int8_scheme(scheme)
    variant = _copy(model)
    settings: dict[str, Any] = {"scheme": scheme}
    if scheme == "nbits8":
        variant = q.nbits(variant, bits=8, block_size=q.NBITS8_BLOCK_SIZE,
                          accuracy_level=q.NBITS8_ACCURACY_LEVEL)
        settings.update(block_size=q.NBITS8_BLOCK_SIZE, accuracy_level=q.NBITS8_ACCURACY_LEVEL)
    else:
        if scheme == "smoothquant":
            settings["smoothed_norms"] = q.smooth(variant, ranges, q.SMOOTH_ALPHA)
            settings["alpha"] = q.SMOOTH_ALPHA
        exclude: list[str] = []
        if scheme != q.NAIVE_INT8_SCHEME:
            users = q.matmul_inputs(variant)
            exclude = sorted(n.name for t in q.outlier_inputs(ranges) for n in users.get(t, []))
        settings.update(per_channel=scheme != q.NAIVE_INT8_SCHEME, outlier_ratio=q.OUTLIER_RATIO,
                        fp32_matmuls=exclude)
        variant = q.dynamic_int8(variant, per_channel=scheme != q.NAIVE_INT8_SCHEME,
                                 exclude=exclude, workdir=workdir)
    if scheme != q.NAIVE_INT8_SCHEME:
        q.quantize_embedding(variant)
        settings["embedding"] = f"8-bit GatherBlockQuantized, block {q.EMBEDDING_BLOCK_SIZE}"
    return variant, settings


INT4_SCHEME = ("4-bit weight-only MatMulNBits (q/k/gate/up), per-channel dynamic int8 "
               "v/o/down_proj, after SmoothQuant-style smoothing; 8-bit GatherBlockQuantized "
               "embeddings")


def int4_variant(model: Any, ranges: dict[str, np.ndarray], *, workdir: Path,
                 accuracy_level: int = q.INT4_ACCURACY_LEVEL) -> tuple[Any, dict[str, Any]]:
    """Build the int4 graph (see ``quantize.INT4_8BIT_MATMULS`` for the measured recipe).

    Smoothing, then 4-bit MatMulNBits on every weight MatMul but v/o/down_proj; those get
    per-channel dynamic int8, or 8-bit MatMulNBits (activations quantized per block) where
    their calibrated input still has outlier channels; 8-bit embeddings.

    Args:
        model: the optimized fp32 graph (weights in memory; not modified).
        ranges: calibrated channel maxima (see ``quantize.calibrate``).
        workdir: scratch folder for the int8 quantizer's files.
        accuracy_level: MatMulNBits compute type.

    Returns:
        The graph and its manifest settings.
    """
    variant = _copy(model)
    smoothed = q.smooth(variant, ranges, q.SMOOTH_ALPHA)
    matmuls = [n.name for n in variant.graph.node if n.op_type == "MatMul"]
    wide = [name for name in matmuls if name.endswith(q.INT4_8BIT_MATMULS)]
    users = q.matmul_inputs(variant)
    outliers = {n.name for t in q.outlier_inputs(ranges) for n in users.get(t, [])}
    blockwise = [name for name in wide if name in outliers]
    dynamic = [name for name in wide if name not in outliers]
    variant = q.nbits(variant, bits=4, block_size=q.INT4_BLOCK_SIZE,
                      accuracy_level=accuracy_level, exclude=wide)
    if blockwise:
        variant = q.nbits(variant, bits=8, block_size=q.INT4_8BIT_BLOCK_SIZE,
                          accuracy_level=accuracy_level, exclude=dynamic)
    if dynamic:
        variant = q.dynamic_int8(variant, per_channel=True, workdir=workdir)
    q.quantize_embedding(variant)
    return variant, {"bits": 4, "block_size": q.INT4_BLOCK_SIZE,
                     "accuracy_level": accuracy_level, "smoothed_norms": smoothed,
                     "alpha": q.SMOOTH_ALPHA, "8bit_matmuls": list(q.INT4_8BIT_MATMULS),
                     "8bit_blockwise_matmuls": blockwise,
                     "embedding": f"8-bit GatherBlockQuantized, block {q.EMBEDDING_BLOCK_SIZE}"}
