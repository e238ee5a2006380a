"""fp16, int8 and int4 variants of any fp32 ONNX graph, built one weight tensor at a time.

The entry points take a graph *file* (a text ``model.onnx``, or a Qwen3-VL ``decoder.onnx`` /
``vision.onnx``), so every family shares them:

- :func:`build_variants` writes several precisions, sharing one smoothing plan;
- :func:`build_variant` writes one.

The source's weights are never all in memory: see :mod:`qwen3emb.export.onnx.lazy`. Weight MatMuls
are found structurally (a MatMul whose second input is a 2-D initializer), so graph fusions
upstream compose; only the int4 recipe's 8-bit exceptions match node names
(``quantize.INT4_8BIT_MATMULS``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.errors import InputError
from qwen3emb.export.onnx.lazy import LazyGraph, Recipe
from qwen3emb.export.quant import quantize as q
from qwen3emb.export.quant.calibrate import Calibration
from qwen3emb.export.quant.ops import (
    rewrite_embedding,
    rewrite_int8,
    rewrite_nbits,
    weight_matmuls,
)

logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Variants above 1 GiB of weights go to ``<model>.onnx_data`` (protobuf caps a file at 2 GiB)."""
INT4_SCHEME = ("4-bit weight-only MatMulNBits (q/k/gate/up), per-channel dynamic int8 "
               "v/o/down_proj (8-bit MatMulNBits where their input keeps outliers), after "
               "SmoothQuant-style smoothing; 8-bit GatherBlockQuantized embeddings")
EMBEDDING_SETTING = f"8-bit GatherBlockQuantized, block {q.EMBEDDING_BLOCK_SIZE}"


@dataclass(frozen=True)
class Variant:
    """One written precision of a graph: its files and how it was made (for the manifest)."""

    precision: str
    files: tuple[Path, ...]
    scheme: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The ``.onnx`` file (``files[1:]`` hold its external data, if any)."""
        return self.files[0]


def variant_path(source: Path, precision: str) -> Path:
    """``model.onnx`` → ``model_int8.onnx`` (``decoder.onnx`` → ``decoder_int8.onnx``)."""
    return source.with_name(f"{source.stem}_{precision}{source.suffix}")


def build_variants(source: Path, precisions: Sequence[str], *,
                   calibration: Calibration | None = None,
                   int8_scheme: str = q.DEFAULT_INT8_SCHEME, external: bool | None = None,
                   progress: bool = False) -> list[Variant]:
    """Write each requested precision of the fp32 graph ``source`` beside it.

    Args:
        source: an optimized fp32 ``.onnx`` file (external data beside it is read lazily).
        precisions: any of ``fp16``, ``int8``, ``int4`` (``fp32`` is skipped: it is
            ``source``).
        calibration: from :func:`qwen3emb.export.quant.calibrate.calibrate` on ``source``; needed
            for int4 and for the int8 schemes that read ranges
            (``quantize.CALIBRATED_INT8_SCHEMES``).
        int8_scheme: one of ``quantize.INT8_SCHEMES``.
        external: write weights to ``<name>_data`` (default: when ``source`` has external
            data or a variant exceeds 1 GiB).
        progress: byte progress bars while writing.

    Returns:
        The written variants, in the order asked.

    Raises:
        InputError: an unknown precision or scheme, or calibration missing where needed.
    """
    plan: list[q.Smoothing] | None = None
    variants = []
    for precision in precisions:
        if precision == "fp32":
            continue
        smoothed = precision == "int4" or (precision == "int8"
                                           and int8_scheme in q.SMOOTHED_INT8_SCHEMES)
        if plan is None and smoothed and calibration is not None:
            plan = q.plan_smoothing(LazyGraph(source), calibration.ranges, q.SMOOTH_ALPHA)
        variants.append(build_variant(source, precision, calibration=calibration,
                                      int8_scheme=int8_scheme, external=external,
                                      progress=progress, smoothing=plan))
    return variants


def build_variant(source: Path, precision: str, *, calibration: Calibration | None = None,
                  int8_scheme: str = q.DEFAULT_INT8_SCHEME, target: Path | None = None,
                  external: bool | None = None, progress: bool = False,
                  smoothing: list[q.Smoothing] | None = None,
                  int4_accuracy_level: int = q.INT4_ACCURACY_LEVEL) -> Variant:
    """Write one precision (``fp16``, ``int8`` or ``int4``) of the fp32 graph ``source``.

    Args:
        source: an optimized fp32 ``.onnx`` file.
        precision: ``fp16``, ``int8`` or ``int4``.
        calibration: activation ranges of ``source`` (see :func:`build_variants`).
        int8_scheme: one of ``quantize.INT8_SCHEMES`` (or the internal naive scheme).
        target: the output file (default: :func:`variant_path`).
        external: see :func:`build_variants`.
        progress: byte progress bar while writing.
        smoothing: a plan from :func:`quantize.plan_smoothing` on ``source``, to reuse.
        int4_accuracy_level: MatMulNBits compute type of the int4 variant.

    Returns:
        The :class:`Variant` written.

    Raises:
        InputError: unknown precision or scheme, or calibration missing where needed.
    """
    target = target or variant_path(source, precision)
    graph = LazyGraph(source)
    if precision == "fp16":
        scheme, settings = _fp16(graph)
    elif precision in ("int8", "int4"):
        if int8_scheme != q.NAIVE_INT8_SCHEME:
            q.check_int8_scheme(int8_scheme)
        needs_ranges = precision == "int4" or int8_scheme in q.CALIBRATED_INT8_SCHEMES
        if needs_ranges and calibration is None:
            raise InputError(f"{precision} ({int8_scheme}) needs calibration ranges",
                             hint="Pass calibration=calibrate(source, feeds)")
        ranges = calibration.ranges if calibration is not None else {}
        if needs_ranges and smoothing is None and (precision == "int4"
                                                   or int8_scheme in q.SMOOTHED_INT8_SCHEMES):
            smoothing = q.plan_smoothing(graph, ranges, q.SMOOTH_ALPHA)
        if precision == "int8":
            scheme, settings = _int8(graph, ranges, int8_scheme, smoothing or [])
        else:
            scheme, settings = _int4(graph, ranges, smoothing or [], int4_accuracy_level)
        if calibration is not None and needs_ranges:
            settings["calibration"] = calibration.describe()
    else:
        raise InputError(f"no variant '{precision}' to build", hint="Use fp16, int8 or int4")
    if external is None:
        external = (graph.has_external_data
                    or graph.nbytes() > EXTERNAL_DATA_THRESHOLD)
    files = graph.save(target, external=external, progress=progress)
    logger.info("wrote %s (%s)", target.name, scheme)
    return Variant(precision, tuple(files), scheme, settings)


def _fp16(graph: LazyGraph) -> tuple[str, dict[str, Any]]:
    """Cast the graph with :func:`fp16.convert_fp16`; the weights are cast when written."""
    import onnx
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from qwen3emb.export.quant.fp16 import FP32_OPS, SCHEME, convert_fp16, residual_adds

    residual = residual_adds(graph.model)  # what convert_fp16 keeps in fp32 besides FP32_OPS
    # The converter sees empty placeholders: it only flips their type to FLOAT16 where fp16
    # nodes read them, which tells which recipes must cast.
    converted = convert_fp16(graph.model)
    kept = [v for v in converted.graph.value_info if v.name not in graph.recipes]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    for tensor in converted.graph.initializer:
        recipe = graph.recipes.get(tensor.name)
        if recipe is not None and tensor.data_type != recipe.dtype:
            if tensor.data_type != onnx.TensorProto.FLOAT16:
                raise ValueError(f"fp16 converter changed {tensor.name} to {tensor.data_type}")
            graph.recipes[tensor.name] = Recipe(tensor.data_type, recipe.shape,
                                                _cast(recipe.make, convert_np_to_float16))
    graph.model = converted
    return SCHEME, {"fp32_ops": list(FP32_OPS), "fp32_residual_adds": len(residual)}


def _cast(make: Callable[[], np.ndarray], convert: Callable[[np.ndarray], np.ndarray]
          ) -> Callable[[], np.ndarray]:
    # The converter's own cast: clamps to fp16's finite range instead of producing Inf.
    def cast() -> np.ndarray:
        array = make()
        return convert(np.atleast_1d(array)).reshape(array.shape)

    return cast


def _int8(graph: LazyGraph, ranges: dict[str, np.ndarray], scheme: str,
          plan: list[q.Smoothing]) -> tuple[str, dict[str, Any]]:
    naive = scheme == q.NAIVE_INT8_SCHEME
    settings: dict[str, Any] = {"scheme": scheme}
    if scheme == "nbits8":
        rewrite_nbits(graph, weight_matmuls(graph), bits=8, block_size=q.NBITS8_BLOCK_SIZE,
                      accuracy_level=q.NBITS8_ACCURACY_LEVEL)
        settings.update(block_size=q.NBITS8_BLOCK_SIZE, accuracy_level=q.NBITS8_ACCURACY_LEVEL)
    else:
        if scheme in q.SMOOTHED_INT8_SCHEMES:
            ranges = q.apply_smoothing(graph, plan, ranges)
            settings.update(smoothed_norms=len(plan), alpha=q.SMOOTH_ALPHA)
        matmuls = weight_matmuls(graph)
        outliers = set() if naive else set(q.outlier_inputs(ranges))
        settings.update(per_channel=not naive, outlier_ratio=q.OUTLIER_RATIO)
        if scheme == "mixed":
            # Only a norm's output is comparable across the items of a batch; the rest (and
            # inputs still with outliers) keep fp32 activations against 8-bit weights.
            normed = q.norm_outputs(graph.model)
            weight_only = [m for m in matmuls if m.input[0] in outliers
                           or m.input[0] not in normed]
            settings.update(weight_only_matmuls=sorted(m.name for m in weight_only),
                            block_size=q.NBITS8_BLOCK_SIZE,
                            accuracy_level=q.NBITS8_ACCURACY_LEVEL)
            rewrite_nbits(graph, weight_only, bits=8, block_size=q.NBITS8_BLOCK_SIZE,
                          accuracy_level=q.NBITS8_ACCURACY_LEVEL)
        else:
            settings["fp32_matmuls"] = sorted(m.name for m in matmuls if m.input[0] in outliers)
        # What is still a weight MatMul and sees no outliers becomes dynamic int8.
        rewrite_int8(graph, [m for m in weight_matmuls(graph) if m.input[0] not in outliers],
                     per_channel=not naive)
    if not naive:
        rewrite_embedding(graph, block_size=q.EMBEDDING_BLOCK_SIZE)
        settings["embedding"] = EMBEDDING_SETTING
    return q.INT8_SCHEMES.get(scheme, "per-tensor dynamic int8 (naive)"), settings


def _int4(graph: LazyGraph, ranges: dict[str, np.ndarray], plan: list[q.Smoothing],
          accuracy_level: int) -> tuple[str, dict[str, Any]]:
    """Smoothing, then 8-bit v/o/down_proj and 4-bit everything else (see
    ``quantize.INT4_8BIT_MATMULS`` for the measured recipe).

    The 8-bit MatMuls get per-channel dynamic int8, or 8-bit MatMulNBits with small blocks
    (activations quantized per block, not per tensor) where their calibrated input still has
    outlier channels after smoothing.
    """
    ranges = q.apply_smoothing(graph, plan, ranges)
    outliers = set(q.outlier_inputs(ranges))
    wide = [m for m in weight_matmuls(graph) if m.name.endswith(q.INT4_8BIT_MATMULS)]
    blockwise = [m for m in wide if m.input[0] in outliers]
    rewrite_nbits(graph, blockwise, bits=8, block_size=q.INT4_8BIT_BLOCK_SIZE,
                  accuracy_level=accuracy_level)
    rewrite_int8(graph, [m for m in wide if m.input[0] not in outliers], per_channel=True)
    # What is still a weight MatMul now is everything but the 8-bit ones.
    rewrite_nbits(graph, weight_matmuls(graph), bits=4, block_size=q.INT4_BLOCK_SIZE,
                  accuracy_level=accuracy_level)
    rewrite_embedding(graph, block_size=q.EMBEDDING_BLOCK_SIZE)
    return INT4_SCHEME, {"bits": 4, "block_size": q.INT4_BLOCK_SIZE,
                         "accuracy_level": accuracy_level, "smoothed_norms": len(plan),
                         "alpha": q.SMOOTH_ALPHA, "8bit_matmuls": list(q.INT4_8BIT_MATMULS),
                         "8bit_blockwise_matmuls": sorted(m.name for m in blockwise),
                         "8bit_block_size": q.INT4_8BIT_BLOCK_SIZE,
                         "outlier_ratio": q.OUTLIER_RATIO, "embedding": EMBEDDING_SETTING}
