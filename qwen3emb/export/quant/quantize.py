"""The int8 and int4 recipes: schemes, their constants, outlier detection and smoothing.

Real Qwen3 checkpoints carry a few hidden channels thousands of times larger than the rest.
Per-tensor dynamic int8 quantization of MatMul inputs then rounds every ordinary channel to
zero (cosine 0.64 reported for a Qwen3-0.6B embedder). The int8 schemes here avoid that in
four ways, measured against each other on outlier fixtures (see tests/test_precision.py,
tests/test_vl_precision.py and scripts/bench.py):

- ``dynamic``: per-channel dynamic int8 (DynamicQuantizeMatMul) on every MatMul whose input
  has no outlier channel; MatMuls whose calibrated input has one stay fp32.
- ``smoothquant``: SmoothQuant-style smoothing (divide each input channel by
  ``s = max|x|^a / max|W|^(1-a)``, folded into the preceding norm weight, and multiply the
  matching weight rows by ``s``), then per-channel dynamic int8 on every MatMul.
- ``nbits8``: 8-bit weight-only MatMulNBits (activations stay fp32 or are quantized per block).
- ``mixed``: smoothing, then dynamic int8 only on MatMuls fed by a norm (their inputs are
  normalized per token, so one activation scale per call suits every item of a batch), and
  8-bit weight-only MatMulNBits on the rest (o_proj, down_proj: unnormalized inputs whose
  per-item peaks differ ~20x between a short text and an image on the Qwen3-VL fixture).

int4 is 4-bit weight-only MatMulNBits after the same smoothing, with v_proj, o_proj and
down_proj at 8 bits (per-channel dynamic int8) and an 8-bit ``GatherBlockQuantized`` embedding
table; see ``INT4_8BIT_MATMULS`` for the measurements behind the mix.

Everything here works on a :class:`~qwen3emb.export.onnx.lazy.LazyGraph`, reading one weight at a
time; :mod:`qwen3emb.export.quant.ops` emits the quantized nodes and
:mod:`qwen3emb.export.quant.variants` puts the recipes together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen3emb.errors import InputError
from qwen3emb.export.onnx.lazy import LazyGraph, Recipe

logger = logging.getLogger(__name__)

INT8_SCHEMES: dict[str, str] = {
    "dynamic": "per-channel dynamic int8 MatMuls; MatMuls with outlier inputs kept fp32",
    "smoothquant": "SmoothQuant-style smoothing folded into the norms, then per-channel "
                   "dynamic int8; MatMuls still with outlier inputs kept fp32",
    "nbits8": "8-bit weight-only MatMulNBits (block-wise, fp32 compute)",
    "mixed": "SmoothQuant-style smoothing folded into the norms, per-channel dynamic int8 on "
             "the MatMuls a norm feeds; 8-bit weight-only MatMulNBits on the others and on "
             "those still seeing outliers",
}
SMOOTHED_INT8_SCHEMES = ("smoothquant", "mixed")
"""int8 schemes that fold SmoothQuant-style smoothing into the norms first."""
CALIBRATED_INT8_SCHEMES = ("dynamic", "smoothquant", "mixed")
"""int8 schemes that read activation ranges (nbits8 is weight-only)."""
DEFAULT_INT8_SCHEME = "smoothquant"
"""Chosen by measurement: every candidate but the naive one clears 0.99 on the outlier fixture
(smoothquant 0.99927, dynamic 0.99804, nbits8 0.99848; scripts/measure_schemes.py at 96508d3).
nbits8 runs at 0.6-1.2x torch at batch 8 x 128 (its int8-activation mode, accuracy level 4,
fails the fixture at 0.987), the two dynamic schemes at 1.7-4.3x (scripts/bench.py, two runs on
a shared 2-core machine). Those two build the same graph on a checkpoint without outliers and
time within noise of each other; on one with outliers smoothquant keeps fewer MatMuls in fp32 (3
vs 4 of 21 on the fixture), so it is the faster of the two there, and the more faithful."""

NAIVE_INT8_SCHEME = "naive"
"""Per-tensor dynamic int8 on every MatMul: not offered, kept to prove the fixture is hard."""

OUTLIER_RATIO = 8.0
"""A MatMul input has outliers when its largest channel max exceeds this many times the
median channel max (ordinary hidden channels sit within ~3x of each other)."""

SMOOTH_ALPHA = 0.5
NBITS8_BLOCK_SIZE = 128
NBITS8_ACCURACY_LEVEL = 0
INT4_BLOCK_SIZE = 128
INT4_ACCURACY_LEVEL = 4
"""int8 activations per block: onnxruntime's 4-bit kernel at fp32 compute (level 0) ran at
0.9-1.0x torch on the 0.6B shape (docs/bench/run3), at level 4 at 1.3-3.0x."""
INT4_8BIT_BLOCK_SIZE = 32
"""Block of the 8-bit MatMulNBits fallback for 8-bit MatMuls whose input keeps outliers."""
INT4_8BIT_MATMULS = ("v_proj/MatMul", "o_proj/MatMul", "down_proj/MatMul")
"""Kept at 8 bits inside the int4 model (llama.cpp's Q4_K_M likewise keeps attn_v and ffn_down
at 6 bits), as per-channel dynamic int8 (DynamicQuantizeMatMul): onnxruntime 1.31's int8 GEMM
is about twice as fast here as its 4-bit kernel (single 1024-row MatMuls, 2 threads:
dynamic int8 3.1-4.4x fp32, 4-bit level 4 1.4-2.4x), so the 8-bit MatMuls cost no speed.

Measured on the random 0.6B-shape checkpoint (min cosine to torch fp32 at the bench cells
1x16 / 8x128 / 1x512; speed = torch time / ONNX time at 8x128, interleaved in one process on
a shared 2-core machine under load ~4-5, where every ONNX/torch ratio reads higher than idle;
compare rows, not absolute values; graphs exported at opset 23, scripts/measure_int4.py at 96508d3):

=================================================  =====================  =====
recipe (scripts/measure_int4.py at 96508d3): 4-bit block,     min cosine             speed
8-bit MatMuls
=================================================  =====================  =====
all 4-bit, block 32 (first measurement, 8x128)     0.929                  -
b32-vd-nbits32: v,down 8-bit MatMulNBits (old)     0.968 / 0.953 / 0.942  1.99
b32-vd-nbits128: same, 8-bit block 128             0.969 / 0.953 / 0.943  2.00
b32-vd: v,down dynamic int8                        0.967 / 0.952 / 0.943  2.17
b32asym-vd: same, 4-bit with zero points           0.972 / 0.946 / 0.955  -
b64-vd                                             0.956 / 0.939 / 0.921  -
b128-vd                                            0.948 / 0.917 / 0.920  -
b32-vkd: k_proj also dynamic int8                  0.969 / 0.952 / 0.947  -
b32-vod: v,o,down dynamic int8                     0.986 / 0.978 / 0.980  2.43
b64-vod                                            0.986 / 0.974 / 0.970  -
b128-vod (default)                                 0.984 / 0.968 / 0.964  2.89
=================================================  =====================  =====

o_proj is the matrix whose 4-bit error costs most; block 128 is the fastest 4-bit kernel and
still leaves >= 0.014 of margin over the 0.95 floor, so it is the default. An 8-bit MatMul
whose calibrated input still has outlier channels after smoothing gets 8-bit MatMulNBits
instead (activations quantized per block, not per tensor)."""
EMBEDDING_BITS = 8
EMBEDDING_BLOCK_SIZE = 32


def check_int8_scheme(scheme: str) -> str:
    """Return ``scheme`` if it is a known int8 scheme.

    Raises:
        InputError: listing the supported schemes.
    """
    if scheme not in INT8_SCHEMES:
        raise InputError(f"unknown int8 scheme '{scheme}'",
                         hint=f"Supported: {', '.join(INT8_SCHEMES)}")
    return scheme


# --- outliers and SmoothQuant-style smoothing --------------------------------------------


def norm_outputs(model: Any) -> set[str]:
    """Normalized outputs of (Skip)SimplifiedLayerNormalization nodes: in a fused Qwen3 graph,
    the inputs of the q/k/v and gate/up projections (the ``mixed`` scheme's int8 MatMuls)."""
    return {n.output[0] for n in model.graph.node
            if n.op_type.endswith("SimplifiedLayerNormalization")}


def outlier_inputs(ranges: dict[str, np.ndarray], ratio: float = OUTLIER_RATIO) -> list[str]:
    """Names of calibrated tensors whose largest channel exceeds ``ratio`` x the median."""
    return [name for name, peak in ranges.items()
            if float(peak.max()) > ratio * max(float(np.median(peak)), 1e-12)]


@dataclass(frozen=True)
class Smoothing:
    """One norm output moved into its MatMuls: divide ``norm_weight`` by ``factors`` per
    channel, multiply the rows of each of ``matmul_weights`` by them."""

    activation: str
    norm_weight: str
    matmul_weights: tuple[str, ...]
    factors: np.ndarray


def plan_smoothing(graph: LazyGraph, ranges: dict[str, np.ndarray],
                   alpha: float = SMOOTH_ALPHA) -> list[Smoothing]:
    """Smoothing factors ``s = max|x|^alpha / max|W|^(1-alpha)`` for each eligible norm.

    A norm output is eligible when it has calibrated ranges and feeds only weight MatMuls,
    and its weight feeds nothing else. Reads each of those MatMul weights once (one at a
    time) for its row maxima.
    """
    consumers: dict[str, list[Any]] = {}
    for node in graph.model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    plan = []
    for node in graph.model.graph.node:
        if not node.op_type.endswith("SimplifiedLayerNormalization"):
            continue
        out = node.output[0]
        users = consumers.get(out, [])
        weight_name = node.input[2] if node.op_type.startswith("Skip") else node.input[1]
        if (out not in ranges or not users or not graph.is_lazy(weight_name)
                or any(u.op_type != "MatMul" or not graph.is_lazy(u.input[1])
                       or len(graph.shape(u.input[1])) != 2 for u in users)
                or len(consumers.get(weight_name, [])) != 1):
            continue
        w_peak = np.max([np.abs(graph.read(u.input[1])).max(axis=1) for u in users], axis=0)
        x_peak = ranges[out]
        s = np.power(np.maximum(x_peak, 1e-5), alpha) / np.power(np.maximum(w_peak, 1e-5),
                                                                    1 - alpha)
        plan.append(Smoothing(out, weight_name, tuple(u.input[1] for u in users),
                              np.clip(s, 1e-5, 1e5).astype(np.float32)))
    return plan


def apply_smoothing(graph: LazyGraph, plan: list[Smoothing], ranges: dict[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """Fold ``plan`` into the graph's recipes (exact in real arithmetic).

    Returns:
        The ranges the smoothed MatMuls now see (``max|x| / s``); the others unchanged.
    """
    import onnx

    smoothed = dict(ranges)
    for item in plan:
        for name in item.matmul_weights:
            graph.row_scales[name] = item.factors
        gamma = item.norm_weight
        graph.replace(gamma, Recipe(onnx.TensorProto.FLOAT, graph.shape(gamma),
                                    _divided(graph, gamma, item.factors)))
        smoothed[item.activation] = ranges[item.activation] / item.factors
    return smoothed


def _divided(graph: LazyGraph, name: str, factors: np.ndarray) -> Any:
    return lambda: graph.read(name) / factors
