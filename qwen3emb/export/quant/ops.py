"""Quantized replacements for weight MatMuls and the embedding Gather, one tensor at a time.

Each ``rewrite_*`` function edits the weightless graph of a :class:`LazyGraph` and gives every
new initializer a recipe that computes it from one fp32 source tensor when the writer asks.
The node patterns are the ones onnxruntime's own quantizers emit, so its kernels and fusions
apply unchanged:

- int8: ``DynamicQuantizeLinear`` (one per activation, shared by its MatMuls) →
  ``MatMulInteger`` → ``Cast`` → ``Mul`` by ``x_scale * w_scale`` (``quantize_dynamic``'s
  pattern; onnxruntime fuses it into ``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul``).
  Per row: each row scaled to [-1, 1], ``QuantizeLinear`` with a fixed step, and
  ``com.microsoft`` ``MatMulIntegerToFloat`` (the kernel that fusion would have chosen).
  Weight codes are symmetric int8 stored as uint8 around 128 (:data:`WEIGHT_ZERO_POINT`).
- n-bit: ``com.microsoft`` ``MatMulNBits`` with weights packed by onnxruntime's own
  ``quantize_matmul_{4,8}bits`` (what its ``MatMulNBitsQuantizer`` calls).
- embedding: ``com.microsoft`` ``GatherBlockQuantized`` with 8-bit blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qwen3emb.constants import INPUT_IDS
from qwen3emb.export.onnx.graph import MS_DOMAIN, use_ms_domain
from qwen3emb.export.onnx.lazy import LazyGraph, OneSlot, Recipe

INT8_LEVELS = 127


def weight_matmuls(graph: LazyGraph) -> list[Any]:
    """MatMul nodes whose second input is a 2-D weight initializer, in graph order.

    A one-column weight (a reranker's score head, ``lm_head[yes] - lm_head[no]``) is left out:
    it stays fp32 in every variant, as it costs one dot product per input and its error would
    reach the output unattenuated."""
    return [n for n in graph.model.graph.node if n.op_type == "MatMul"
            and graph.is_lazy(n.input[1]) and len(shape := graph.shape(n.input[1])) == 2
            and shape[1] > 1]


# --- per-tensor numerics ------------------------------------------------------------------


def int8_weights(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of a ``[K, N]`` weight: per output column, or one scale.

    Returns:
        ``(codes int8 [K, N], scales float32 [N] or [])``.
    """
    peak = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    scales = (np.maximum(peak, 1e-12) / INT8_LEVELS).astype(np.float32)
    codes = np.clip(np.rint(w / scales), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return codes, np.asarray(scales, np.float32)


def nbits_weights(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack a ``[K, N]`` weight for ``MatMulNBits`` (symmetric, blocks along K).

    Uses onnxruntime's C++ packer, as ``MatMulNBitsQuantizer`` does.

    Returns:
        ``(packed uint8 [N, K/block, block*bits/8], scales float32 [N, K/block])``.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = w.shape
    per_byte = 8 // bits
    blocks = -(-rows // block_size)
    if blocks * block_size != rows:
        w = np.pad(w, ((0, blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, blocks, -(-block_size // per_byte)), np.uint8)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), np.uint8)  # unused: symmetric
    scales = np.zeros((cols, blocks), np.float32)
    pack = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    pack(packed, np.ascontiguousarray(w, np.float32), scales, zero_points, block_size, cols,
         rows, True)
    return packed, scales


def embedding_blocks(table: np.ndarray, block_size: int, bits: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block codes of a ``[rows, width]`` table, stored as uint8 around 2^(b-1).

    Returns:
        ``(codes uint8 [rows, width], scales float32 [rows, width / block])``.
    """
    rows, width = table.shape
    levels = (1 << (bits - 1)) - 1
    blocks = table.reshape(rows, width // block_size, block_size)
    scales = np.maximum(np.abs(blocks).max(axis=-1), 1e-12) / levels
    codes = np.clip(np.rint(blocks / scales[..., None]), -levels, levels).astype(np.int16)
    codes = (codes + (1 << (bits - 1))).astype(np.uint8).reshape(rows, width)
    return codes, scales.astype(np.float32)


# --- graph rewrites -----------------------------------------------------------------------


def _derived(graph: LazyGraph, slot: OneSlot, source: str, index: int,
             compute: Callable[[np.ndarray], tuple[np.ndarray, ...]]) -> Callable[[], Any]:
    """Output ``index`` of ``compute(read(source))``; the sibling outputs share one pass."""
    return lambda: slot.get(source, lambda: compute(graph.read(source)))[index]


def _filled(shape: tuple[int, ...], value: int, dtype: Any) -> Callable[[], np.ndarray]:
    return lambda: np.full(shape, value, dtype)


def _splice(graph: LazyGraph, replaced: dict[str, list[Any]]) -> None:
    """Replace nodes (keyed by their first output) with lists of nodes, keeping the order."""
    nodes = []
    for node in graph.model.graph.node:
        nodes.extend(replaced.get(node.output[0], [node]) if node.output else [node])
    del graph.model.graph.node[:]
    graph.model.graph.node.extend(nodes)
    graph.drop_unused()


WEIGHT_ZERO_POINT = 128
"""Zero point of the stored weight codes: symmetric int8 codes kept as uint8 around 128.

onnxruntime's x86 kernels for uint8 activations times int8 weights add pairs of products in
int16 where the CPU lacks VNNI (AVX2, AVX-512 BW: ``vpmaddubsw``), which saturates past 32767
(255 × 127 × 2 = 64770): on such CPUs the same graph silently loses up to half its precision.
uint8 × uint8 widens both to 16 bits before multiplying and is exact on every CPU, for about
a quarter more time per MatMul than the saturating kernel."""


def uint8_weight_codes(codes: np.ndarray) -> np.ndarray:
    """Symmetric int8 codes stored as uint8 around :data:`WEIGHT_ZERO_POINT`."""
    return (codes.astype(np.int16) + WEIGHT_ZERO_POINT).astype(np.uint8)


ROW_SCALE = np.float32(2 / 255)
"""uint8 step of a row scaled to [-1, 1] (zero point 128): what ``DynamicQuantizeLinear`` would
choose for that range, fixed so that no row depends on another."""
ROW_ZERO_POINT = 128


def _row_scaled(graph: LazyGraph, x: str) -> tuple[list[Any], str, str]:
    """Nodes that scale every row of ``x`` to [-1, 1] and quantize it to uint8, the codes'
    name, and the name of the row maxima (the output is multiplied by them).

    Every row is divided by its own largest magnitude (a zero row by a tiny floor: it stays
    zero), so one fixed step, :data:`ROW_SCALE`, is each row's own: int8 activations per row
    (per token), with ``QuantizeLinear`` instead of ``DynamicQuantizeLinear``, whose one scale
    per call would tie every text of a batch to the largest value of any of them.
    """
    from onnx import TensorProto, helper

    axes, floor = f"{x}_row_axes", f"{x}_row_floor"
    step, zero = f"{x}_row_step", f"{x}_row_zero_point"
    nodes = [helper.make_node("Abs", [x], [f"{x}_abs"], name=f"{x}_row_abs")]
    opset = max((o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")),
                default=18)
    if opset >= 18:
        graph.replace(axes, Recipe(TensorProto.INT64, (1,),
                                   lambda: np.asarray([-1], np.int64)))
        nodes.append(helper.make_node("ReduceMax", [f"{x}_abs", axes], [f"{x}_row_max"],
                                      name=f"{x}_row_max", keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMax", [f"{x}_abs"], [f"{x}_row_max"],
                                      name=f"{x}_row_max", axes=[-1], keepdims=1))
    graph.replace(floor, Recipe(TensorProto.FLOAT, (), lambda: np.asarray(1e-30, np.float32)))
    graph.replace(step, Recipe(TensorProto.FLOAT, (), lambda: np.asarray(ROW_SCALE)))
    graph.replace(zero, Recipe(TensorProto.UINT8, (),
                               lambda: np.asarray(ROW_ZERO_POINT, np.uint8)))
    nodes += [
        helper.make_node("Max", [f"{x}_row_max", floor], [f"{x}_rows"], name=f"{x}_rows"),
        helper.make_node("Div", [x, f"{x}_rows"], [f"{x}_row_scaled"], name=f"{x}_row_div"),
        helper.make_node("QuantizeLinear", [f"{x}_row_scaled", step, zero],
                         [f"{x}_row_quantized"], name=f"{x}_row_QuantizeLinear"),
    ]
    return nodes, f"{x}_row_quantized", f"{x}_rows"


def rewrite_int8(graph: LazyGraph, nodes: Sequence[Any], *, per_channel: bool = True,
                 per_row: bool = False) -> int:
    """Dynamic int8 for ``nodes`` (weight MatMuls), with symmetric int8 weights.

    Args:
        per_row: int8 activations per row (per token) instead of one scale per call
            (:func:`_row_scaled`): a few more element-wise ops per activation, and no text's
            embedding depends on what else is in its batch.

    Returns:
        How many MatMuls were quantized.
    """
    import onnx
    from onnx import TensorProto, helper

    slot = OneSlot()
    quantized: dict[str, tuple[str, str, str]] = {}  # activation → codes, zero point, rows
    replaced: dict[str, list[Any]] = {}
    for node in nodes:
        x, w, y = node.input[0], node.input[1], node.output[0]
        k, n = graph.shape(w)
        width: tuple[int, ...] = (n,) if per_channel else ()

        def compute(array: np.ndarray) -> tuple[np.ndarray, ...]:
            codes, scales = int8_weights(array, per_channel)
            return uint8_weight_codes(codes), scales

        graph.replace(f"{w}_quantized", Recipe(TensorProto.UINT8, (k, n),
                                               _derived(graph, slot, w, 0, compute)))
        graph.replace(f"{w}_scale", Recipe(TensorProto.FLOAT, width,
                                           _derived(graph, slot, w, 1, compute)))
        graph.replace(f"{w}_zero_point", Recipe(TensorProto.UINT8, width,
                                                _filled(width, WEIGHT_ZERO_POINT, np.uint8)))
        name = node.name or y
        new = []
        if x not in quantized:
            if per_row:
                row_nodes, codes, rows = _row_scaled(graph, x)
                new += row_nodes
                quantized[x] = (codes, f"{x}_row_zero_point", rows)
            else:
                quantized[x] = (f"{x}_quantized", f"{x}_zero_point", "")
                new.append(helper.make_node("DynamicQuantizeLinear", [x],
                                            [f"{x}_quantized", f"{x}_scale",
                                             f"{x}_zero_point"],
                                            name=f"{x}_QuantizeLinear"))
        codes, zero, rows = quantized[x]
        if per_row:
            # The activation step is fixed, so onnxruntime's fused kernel is named directly
            # (its fusion only matches the dynamic pattern).
            new += [
                helper.make_node("MatMulIntegerToFloat",
                                 [codes, f"{w}_quantized", f"{x}_row_step", f"{w}_scale", zero,
                                  f"{w}_zero_point"], [f"{name}_row_scaled_output"],
                                 name=f"{name}_quant", domain=MS_DOMAIN),
                helper.make_node("Mul", [f"{name}_row_scaled_output", rows], [y],
                                 name=f"{name}_row_output_mul"),
            ]
            replaced[node.output[0]] = new
            continue
        new += [
            helper.make_node("Mul", [f"{x}_scale", f"{w}_scale"], [f"{name}_scales"],
                             name=f"{name}_quant_scales_mul"),
            helper.make_node("MatMulInteger", [codes, f"{w}_quantized", zero,
                                               f"{w}_zero_point"],
                             [f"{name}_int32"], name=f"{name}_quant"),
            helper.make_node("Cast", [f"{name}_int32"], [f"{name}_float"],
                             name=f"{name}_quant_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{name}_float", f"{name}_scales"], [y],
                             name=f"{name}_quant_output_scale_mul"),
        ]
        replaced[node.output[0]] = new
    if per_row and replaced:
        use_ms_domain(graph.model)
    _splice(graph, replaced)
    return len(replaced)


def rewrite_nbits(graph: LazyGraph, nodes: Sequence[Any], *, bits: int, block_size: int,
                  accuracy_level: int) -> int:
    """Weight-only ``MatMulNBits`` (symmetric, ``block_size`` along K) for ``nodes``.

    Returns:
        How many MatMuls were quantized.
    """
    from onnx import TensorProto, helper

    slot = OneSlot()
    replaced: dict[str, list[Any]] = {}
    for node in nodes:
        w = node.input[1]
        k, n = graph.shape(w)
        blocks = -(-k // block_size)

        def compute(array: np.ndarray) -> tuple[np.ndarray, ...]:
            return nbits_weights(array, bits, block_size)

        packed, scales = f"{w}_Q{bits}", f"{w}_scales"
        graph.replace(packed, Recipe(TensorProto.UINT8, (n, blocks, block_size * bits // 8),
                                     _derived(graph, slot, w, 0, compute)))
        graph.replace(scales, Recipe(TensorProto.FLOAT, (n, blocks),
                                     _derived(graph, slot, w, 1, compute)))
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block_size}
        if accuracy_level:  # onnxruntime's quantizer omits the attribute when it is 0
            attrs["accuracy_level"] = accuracy_level
        replaced[node.output[0]] = [helper.make_node(
            "MatMulNBits", [node.input[0], packed, scales], [node.output[0]],
            name=f"{node.name or node.output[0]}_Q{bits}", domain=MS_DOMAIN, **attrs)]
    _splice(graph, replaced)
    if replaced:
        use_ms_domain(graph.model)
    return len(replaced)


def token_embedding(graph: LazyGraph) -> Any:
    """The ``Gather`` of a 2-D weight table by the graph's token ids, or None. Other tables
    (the Qwen3-VL vision tower's learned position table) stay fp32: they are small and
    their Gather costs nothing."""
    return next((n for n in graph.model.graph.node if n.op_type == "Gather"
                 and n.input[1] == INPUT_IDS and graph.is_lazy(n.input[0])
                 and len(graph.shape(n.input[0])) == 2), None)


def rewrite_embedding(graph: LazyGraph, *, block_size: int, bits: int = 8) -> str | None:
    """Replace the token-embedding ``Gather`` with ``GatherBlockQuantized`` (uint8 blocks).

    Symmetric per-block quantization along the hidden axis with a fixed zero point of
    ``2^(bits-1)``.

    Returns:
        The quantized table's name, or None when the graph has no token-embedding Gather
        (:func:`token_embedding`) whose width is a multiple of ``block_size``.
    """
    from onnx import TensorProto, helper

    gather = token_embedding(graph)
    if gather is None:
        return None
    name = gather.input[0]
    rows, width = graph.shape(name)
    if width % block_size:
        return None
    slot = OneSlot()

    def compute(array: np.ndarray) -> tuple[np.ndarray, ...]:
        return embedding_blocks(array, block_size, bits)

    codes, scales, zeros = f"{name}.q{bits}", f"{name}.scales", f"{name}.zero_points"
    graph.replace(codes, Recipe(TensorProto.UINT8, (rows, width),
                                _derived(graph, slot, name, 0, compute)))
    graph.replace(scales, Recipe(TensorProto.FLOAT, (rows, width // block_size),
                                 _derived(graph, slot, name, 1, compute)))
    graph.replace(zeros, Recipe(TensorProto.UINT8, (rows, width // block_size), _filled(
        (rows, width // block_size), 1 << (bits - 1), np.uint8)))
    node = helper.make_node("GatherBlockQuantized", [codes, gather.input[1], scales, zeros],
                            list(gather.output), name=f"{name}/GatherBlockQuantized",
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                            block_size=block_size, bits=bits)
    _splice(graph, {gather.output[0]: [node]})
    use_ms_domain(graph.model)
    return name
