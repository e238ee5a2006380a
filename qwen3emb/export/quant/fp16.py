"""fp16 weights with fp32 where fp16 overflows: norms, softmax, the residual stream, pooling.

Real Qwen3 checkpoints carry a few hidden channels whose activations reach thousands; their
squares (inside RMSNorm) exceed fp16's 65504 and turn into Inf, then NaN (reported for the
8B model). The graph optimizer (:mod:`qwen3emb.export.onnx.optimize`) has already folded every
RMSNorm and residual Add into (Skip)SimplifiedLayerNormalization nodes; keeping those nodes in
fp32 keeps the norms' statistics and the whole residual stream in fp32, while the MatMuls,
which hold nearly all the weights and the time, run in fp16. Residual Adds the optimizer
could not fold (the Qwen3-VL decoder's deepstack layers add a second term before the next
norm; the vision tower's LayerNorms are not fused) are kept in fp32 by name instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from qwen3emb.errors import MissingDependencyError, OutputError
from qwen3emb.export.onnx.attention import PREFIX as ATTENTION_PREFIX
from qwen3emb.export.onnx.graph import sort_nodes

logger = logging.getLogger(__name__)

FP32_OPS: tuple[str, ...] = (
    # Norm statistics and the residual sum (x^2 overflows fp16 on outlier channels).
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "Pow",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
    # GELUs fused by the optimizer (x^3 overflows fp16 inside FastGelu, as in its Pow form).
    "FastGelu",
    "Gelu",
    # Attention probabilities, the rotary tables and the mask bias.
    "Softmax",
    "Cos",
    "Sin",
    "Where",
    # Pooling and the final L2 normalization (the output is fp32 by contract).
    "GatherND",
    "ArgMax",
    "ReduceL2",
    "Div",
)
"""Op types that stay fp32 in the fp16 artifact (inputs are cast up around them)."""

SCHEME = "fp16 weights and MatMuls; norms, residual stream, softmax, rotary, pooling in fp32"

NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def residual_adds(model: Any) -> list[str]:
    """Names of the residual-stream Adds left unfused: Adds of two computed tensors whose sum
    feeds a norm, directly or through Reshapes (unnamed ones are named here, in place).

    Returns:
        The node names, in graph order.
    """
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}

    def feeds_norm(tensor: str, depth: int = 0) -> bool:
        for user in consumers.get(tensor, []):
            if user.op_type in NORM_OPS or (user.op_type == "Reshape" and depth < 2
                                            and feeds_norm(user.output[0], depth + 1)):
                return True
        return False

    names = []
    for i, node in enumerate(model.graph.node):
        if (node.op_type == "Add" and not any(x in constants for x in node.input)
                and feeds_norm(node.output[0])):
            node.name = node.name or f"residual_add_{i}"
            names.append(node.name)
    return names


def convert_fp16(model: Any, *, keep_fp32_ops: tuple[str, ...] = FP32_OPS) -> Any:
    """Return an fp16 copy of an optimized fp32 graph with fp32 inputs and outputs.

    Args:
        model: an ``onnx.ModelProto`` after :func:`qwen3emb.export.onnx.optimize.optimize_graph`.
        keep_fp32_ops: op types computed in fp32, besides the unfused residual Adds
            (:func:`residual_adds`); pass ``()`` to get the naive conversion, used by tests to
            show why the default exists.

    Returns:
        The converted ``onnx.ModelProto`` (``model`` is not modified).

    Raises:
        MissingDependencyError: onnxruntime's transformers tools are not importable.
        OutputError: the converter failed.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )
    except ImportError as e:
        raise MissingDependencyError(
            "onnxruntime.transformers.float16 is not importable",
            hint="Install onnxruntime >= 1.20 (it ships the fp16 converter)",
        ) from e
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep_nodes = residual_adds(copy) if keep_fp32_ops else []
    # The blocked attention (scores, softmax, its Loop) stays fp32, as Softmax always did.
    keep_nodes += [n.name for n in copy.graph.node if n.name.startswith(ATTENTION_PREFIX)]
    try:
        converted = convert_float_to_float16(
            copy,
            keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_fp32_ops),
            node_block_list=keep_nodes,
            disable_shape_infer=True,
        )
    except Exception as e:  # the converter raises bare exceptions on unexpected graphs
        raise OutputError(f"fp16 conversion failed: {type(e).__name__}: {str(e)[:200]}",
                          hint="Export without --precision fp16 and report the problem") from e
    drop_duplicate_casts(converted)
    unique_node_names(converted)
    # The converter appends the Casts it puts before fp32 nodes; evaluators that run nodes
    # in file order (onnx's reference) need them before their readers.
    sort_nodes(converted)
    logger.info("fp16: kept %s and %d residual Adds in fp32", sorted(keep_fp32_ops),
                len(keep_nodes))
    return converted


def drop_duplicate_casts(model: Any) -> int:
    """Remove repeated Casts that write an already-defined tensor.

    When one fp16 tensor feeds several fp32-only nodes, the converter inserts one identical
    ``Cast`` per consumer, all writing ``<tensor>_cast_to_fp32``; onnxruntime rejects the
    duplicate definitions. The copies are identical, so keeping the first is exact.

    Returns:
        How many Casts were removed.
    """
    defined: dict[str, tuple[Any, ...]] = {}
    kept = []
    for node in model.graph.node:
        key = (node.op_type, tuple(node.input), node.SerializeToString(deterministic=True)
               if node.op_type != "Cast" else tuple(a.i for a in node.attribute))
        first = node.output[0] if node.output else None
        if node.op_type == "Cast" and first in defined and defined[first] == key:
            continue
        if first is not None:
            defined.setdefault(first, key)
        kept.append(node)
    removed = len(model.graph.node) - len(kept)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return removed


def unique_node_names(model: Any) -> int:
    """Suffix repeated node names (the converter names each inserted Cast after its tensor).

    onnxruntime refuses graphs with two nodes of one name.

    Returns:
        How many nodes were renamed.
    """
    seen: Counter[str] = Counter()
    renamed = 0
    for node in model.graph.node:
        if node.name and seen[node.name]:
            node.name = f"{node.name}_{seen[node.name]}"
            renamed += 1
        seen[node.name] += 1
    return renamed
