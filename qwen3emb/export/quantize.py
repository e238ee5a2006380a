"""int8 and int4 variants of the optimized fp32 graph, built with onnxruntime's quantizers.

Real Qwen3 checkpoints carry a few hidden channels thousands of times larger than the rest.
Per-tensor dynamic int8 quantization of MatMul inputs then rounds every ordinary channel to
zero (cosine 0.64 reported for a Qwen3-0.6B embedder). The int8 schemes here avoid that in
three ways, measured against each other on an outlier fixture (see tests/test_precision.py
and scripts/bench.py):

- ``dynamic``: per-channel dynamic int8 (DynamicQuantizeMatMul) on every MatMul whose input
  has no outlier channel; MatMuls whose calibrated input has one stay fp32.
- ``smoothquant``: SmoothQuant-style smoothing (divide each input channel by
  ``s = max|x|^a / max|W|^(1-a)``, folded into the preceding norm weight, and multiply the
  matching weight rows by ``s``), then per-channel dynamic int8 on every MatMul.
- ``nbits8``: 8-bit weight-only MatMulNBits (activations stay fp32 or are quantized per block).

int4 is 4-bit weight-only MatMulNBits after the same smoothing, with v_proj, o_proj and
down_proj at 8 bits (per-channel dynamic int8) and an 8-bit ``GatherBlockQuantized`` embedding
table; see ``INT4_8BIT_MATMULS`` for the measurements behind the mix.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.errors import InputError, OutputError

logger = logging.getLogger(__name__)

INT8_SCHEMES: dict[str, str] = {
    "dynamic": "per-channel dynamic int8 MatMuls; MatMuls with outlier inputs kept fp32",
    "smoothquant": "SmoothQuant-style smoothing folded into the norms, then per-channel "
                   "dynamic int8; MatMuls still with outlier inputs kept fp32",
    "nbits8": "8-bit weight-only MatMulNBits (block-wise, fp32 compute)",
}
DEFAULT_INT8_SCHEME = "smoothquant"
"""Chosen by measurement: every candidate but the naive one clears 0.99 on the outlier fixture
(smoothquant 0.99927, dynamic 0.99804, nbits8 0.99848; scripts/measure_schemes.py). nbits8
runs at 0.6-1.2x torch at batch 8 x 128 (its int8-activation mode, accuracy level 4, fails the
fixture at 0.987), the two dynamic schemes at 1.7-4.3x (scripts/bench.py, two runs on a shared
2-core machine). Those two build the
same graph on a checkpoint without outliers and time within noise of each other; on one with
outliers smoothquant keeps fewer MatMuls in fp32 (3 vs 4 of 21 on the fixture), so it is the
faster of the two there, and the more faithful."""

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
compare rows, not absolute values; graphs exported at opset 23, scripts/measure_int4.py):

=================================================  =====================  =====
recipe (scripts/measure_int4.py): 4-bit block,     min cosine             speed
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


# --- calibration --------------------------------------------------------------------------


def matmul_inputs(model: Any) -> dict[str, list[Any]]:
    """Activation tensors that feed weight MatMuls → the MatMul nodes reading them."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            out.setdefault(node.input[0], []).append(node)
    return out


def calibrate(model: Any, feeds: Iterable[dict[str, np.ndarray]], *,
              workdir: Path | None = None) -> dict[str, np.ndarray]:
    """Per-channel max |x| of every weight-MatMul input over the calibration feeds.

    Args:
        model: the optimized fp32 graph (weights in memory).
        feeds: onnxruntime input dicts (``input_ids``, ``attention_mask``), unpadded.
        workdir: where to write a temporary copy of graphs too large to pass in memory.

    Returns:
        ``{tensor name: [K] float32 channel maxima}``.
    """
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(matmul_inputs(model))
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Fusions could swallow the tapped tensors; basic constant folding keeps them.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if sum(len(t.raw_data) for t in probe.graph.initializer) > (1 << 30):
            path = Path(tmp) / "calibrate.onnx"
            onnx.save_model(probe, os.fspath(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location="calibrate.onnx.data",
                            size_threshold=1024)
            source: Any = os.fspath(path)
        else:
            source = probe.SerializeToString()
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(wanted, session.run(wanted, feed)):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float32)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges


def outlier_inputs(ranges: dict[str, np.ndarray], ratio: float = OUTLIER_RATIO) -> list[str]:
    """Names of calibrated tensors whose largest channel exceeds ``ratio`` x the median."""
    return [name for name, peak in ranges.items()
            if float(peak.max()) > ratio * max(float(np.median(peak)), 1e-12)]


# --- SmoothQuant-style smoothing ----------------------------------------------------------


def smooth(model: Any, ranges: dict[str, np.ndarray], alpha: float = SMOOTH_ALPHA) -> int:
    """Move activation outliers into the weights, in place, exactly (in real arithmetic).

    For each norm output that only feeds weight MatMuls, divide the norm weight by
    ``s = max|x|^alpha / max|W|^(1-alpha)`` per channel and multiply the MatMuls' weight rows
    by ``s``. The fp32 graph computes the same function; the int8 one sees tamer inputs.

    Returns:
        How many norm outputs were smoothed.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    count = 0
    for node in model.graph.node:
        if not node.op_type.endswith("SimplifiedLayerNormalization"):
            continue
        out = node.output[0]
        users = consumers.get(out, [])
        weight_name = node.input[2] if node.op_type.startswith("Skip") else node.input[1]
        if (out not in ranges or not users or weight_name not in inits
                or any(u.op_type != "MatMul" or u.input[1] not in inits for u in users)
                or len(consumers.get(weight_name, [])) != 1):
            continue
        weights = [numpy_helper.to_array(inits[u.input[1]]) for u in users]  # [K, N] each
        w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        x_peak = ranges[out]
        s = np.power(np.maximum(x_peak, 1e-5), alpha) / np.power(np.maximum(w_peak, 1e-5),
                                                                    1 - alpha)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        gamma = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
        inits[weight_name].CopyFrom(numpy_helper.from_array(gamma / s, weight_name))
        for user, w in zip(users, weights):
            name = user.input[1]
            inits[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), name))
        ranges[out] = x_peak / s
        count += 1
    return count


# --- the quantizers -----------------------------------------------------------------------


def _save_for_quantizer(model: Any, folder: Path) -> Path:
    """Write ``model`` with external data so quantizers can load >2 GB graphs by path."""
    import onnx

    path = folder / "input.onnx"
    onnx.save_model(model, os.fspath(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="input.onnx.data", size_threshold=1024)
    return path


def dynamic_int8(model: Any, *, per_channel: bool = True, exclude: Iterable[str] = (),
                 workdir: Path) -> Any:
    """Dynamic int8 on weight MatMuls (onnxruntime ``quantize_dynamic``), except ``exclude``.

    Returns:
        The quantized ``onnx.ModelProto`` (external data loaded into memory).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = _save_for_quantizer(model, workdir)
    target = workdir / "int8.onnx"
    # quantize_dynamic logs advice on the root logger; library code keeps it quiet.
    hush = _DropRecords("pre-processing before quantization")
    logging.getLogger().addFilter(hush)
    try:
        quantize_dynamic(os.fspath(source), os.fspath(target), op_types_to_quantize=["MatMul"],
                         per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(exclude), use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    except Exception as e:  # onnxruntime's quantizer raises bare exceptions
        raise OutputError(f"int8 quantization failed: {type(e).__name__}: {str(e)[:200]}",
                          hint="Try another --int8-scheme") from e
    finally:
        logging.getLogger().removeFilter(hush)
    return onnx.load(os.fspath(target))


class _DropRecords(logging.Filter):
    """Drop log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def nbits(model: Any, *, bits: int, block_size: int, accuracy_level: int | None,
          embedding: bool = False, exclude: Iterable[str] = ()) -> Any:
    """Weight-only MatMulNBits (and optionally a GatherBlockQuantized embedding table).

    Args:
        model: the optimized fp32 graph (modified in place and returned).
        bits: 4 or 8.
        block_size: weights per quantization block along K.
        accuracy_level: MatMulNBits compute type (0/1 fp32, 4 int8 activations per block).
        embedding: also quantize the token embedding Gather to 4 bits.
        exclude: node names to leave in fp32.

    Returns:
        The quantized ``onnx.ModelProto``.
    """
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    ops = ("MatMul", "Gather") if embedding else ("MatMul",)
    config = mnq.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
        op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)), bits=bits)
    try:
        quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size,
                                             is_symmetric=True, accuracy_level=accuracy_level,
                                             nodes_to_exclude=list(exclude),
                                             op_types_to_quantize=ops, algo_config=config)
        quantizer.process()
    except Exception as e:  # onnxruntime's quantizer raises bare exceptions
        raise OutputError(f"{bits}-bit quantization failed: {type(e).__name__}: {str(e)[:200]}",
                          hint="Export without this precision and report the problem") from e
    return quantizer.model.model


def quantize_embedding(model: Any, *, block_size: int = EMBEDDING_BLOCK_SIZE) -> str | None:
    """Replace the token-embedding ``Gather`` with an 8-bit ``GatherBlockQuantized``.

    Symmetric per-block quantization along the hidden axis, stored as uint8 codes with a
    fixed zero point of 128. 8 bits, not 4: a 4-bit table loses every ordinary channel of a
    block that holds an outlier column (measured on the outlier fixture); the 4-bit
    variant is ``nbits(..., embedding=True)``.

    Returns:
        The quantized table's name, or None when the graph has no embedding Gather.
    """
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    gather = next((n for n in model.graph.node if n.op_type == "Gather"
                   and n.input[0] in inits and len(inits[n.input[0]].dims) == 2), None)
    if gather is None:
        return None
    name = gather.input[0]
    table = numpy_helper.to_array(inits[name]).astype(np.float32)
    rows, width = table.shape
    if width % block_size:
        return None
    bits = 8
    levels = (1 << (bits - 1)) - 1
    blocks = table.reshape(rows, width // block_size, block_size)
    scales = np.maximum(np.abs(blocks).max(axis=-1), 1e-12) / levels
    codes = np.clip(np.rint(blocks / scales[..., None]), -levels, levels).astype(np.int16)
    offset = 1 << (bits - 1)
    codes = (codes + offset).astype(np.uint8).reshape(rows, width)
    zero = np.full((rows, width // block_size), offset, np.uint8)
    new = [numpy_helper.from_array(codes, f"{name}.q{bits}"),
           numpy_helper.from_array(scales.astype(np.float32), f"{name}.scales"),
           numpy_helper.from_array(zero, f"{name}.zero_points")]
    node = onnx.helper.make_node(
        "GatherBlockQuantized", [t.name for t in new[:1]] + [gather.input[1]]
        + [t.name for t in new[1:]], list(gather.output), name=f"{name}/GatherBlockQuantized",
        domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block_size,
        bits=bits)
    index = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(index, node)
    kept = [t for t in model.graph.initializer if t.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return name
