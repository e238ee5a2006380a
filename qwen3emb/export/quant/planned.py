"""Build an int8 / int4 graph from a per-MatMul plan: which tensor gets which treatment.

The fixed recipes of :mod:`qwen3emb.export.quant.variants` give every MatMul of a role the
same treatment. The fidelity search (:mod:`qwen3emb.export.quant.search`) instead decides per
MatMul, starting from the recipe's choices (:func:`initial_plan`) and escalating the sensitive
ones along :data:`LADDERS`; this module writes whatever plan it settles on, one weight at a
time like every variant.

The token-embedding table is 8-bit ``GatherBlockQuantized`` as in the recipes, except that
columns found to be outliers (:func:`sensitivity.measure_embedding`) are kept apart: zero in the
block table (so its scales exclude them) and gathered from a small fp32 side table, placed
back by a one-hot MatMul (exact: each output is one product by 1.0 plus zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.export.onnx.lazy import LazyGraph, OneSlot, Recipe
from qwen3emb.export.quant import quantize as q
from qwen3emb.export.quant.ops import (
    embedding_blocks,
    rewrite_embedding,
    rewrite_int8,
    rewrite_nbits,
    weight_matmuls,
)


@dataclass(frozen=True)
class Tier:
    """One treatment of a weight MatMul."""

    kind: str  # "dynamic" (DynamicQuantizeMatMul), "nbits" (MatMulNBits) or "fp32"
    bits: int = 8
    block_size: int = 0
    accuracy_level: int = 0
    description: str = ""
    per_row: bool = False

    def bytes_per_weight(self) -> float:
        if self.kind == "fp32":
            return 4.0
        if self.kind == "dynamic":
            return 1.0
        return self.bits / 8 + 4 / self.block_size


TIERS: dict[str, Tier] = {
    "int4": Tier("nbits", 4, q.INT4_BLOCK_SIZE, q.INT4_ACCURACY_LEVEL,
                 "4-bit MatMulNBits, int8 activations per block"),
    "int8": Tier("dynamic", 8, 0, 0, "per-channel int8 weights, per-tensor dynamic int8 "
                                     "activations (DynamicQuantizeMatMul)"),
    "int8-row": Tier("dynamic", 8, 0, 0, "per-channel int8 weights, int8 activations per row "
                                         "(each row scaled to [-1, 1], one fixed uint8 step: "
                                         "no row depends on another)", per_row=True),
    "nbits8-128": Tier("nbits", 8, q.NBITS8_BLOCK_SIZE, q.NBITS8_ACCURACY_LEVEL,
                       "8-bit MatMulNBits block 128, fp32 activations"),
    "nbits8": Tier("nbits", 8, q.INT4_8BIT_BLOCK_SIZE, q.INT4_ACCURACY_LEVEL,
                   "8-bit MatMulNBits block 32, int8 activations per 32-block (as q8_0)"),
    "fp32": Tier("fp32", description="fp32 MatMul"),
}
SIZE_LADDER: dict[str, str] = {"int4": "int8-row", "int8": "int8-row",
                               "int8-row": "nbits8-128", "nbits8": "nbits8-128",
                               "nbits8-128": "fp32"}
"""The next, more faithful treatment of each tier, at the least added size: int4's ladder (its
point is size). Per-row int8 activations cost no bytes over per-tensor ones. 8-bit weights
with fp32 activations come before fp32; they come before int8 activations per 32-block too:
on the outlier fixtures, ``nbits8`` (as q8_0) left the embedding-outlier fixture at 0.9918
where fp32 activations held."""
SPEED_LADDER: dict[str, str] = {**SIZE_LADDER, "int8-row": "fp32", "nbits8": "fp32"}
"""int8's ladder (its point is speed): per-tensor int8 to per-row int8, then straight to fp32.
Where fp32 would break the size budget, 8-bit weights with int8 activations per 32-block
(``nbits8``, as q8_0) are tried instead (:data:`SPEED_FALLBACK`), never ``nbits8-128``: with
fp32 activations onnxruntime dequantizes the weights on every call, 2x slower than the fp32
MatMul at 128 rows and 10x at 16 (``scripts/bench_kernels.py``: 8.4 / 4.8 ms against 4.0 /
0.49 ms), where ``nbits8`` is faster than fp32 at every size (2.65 / 0.34 ms)."""
LADDERS: dict[str, dict[str, str]] = {"int8": SPEED_LADDER, "int4": SIZE_LADDER}
FALLBACK: dict[str, str] = {"fp32": "nbits8-128"}
"""Where an escalation to the key would exceed the size budget, the value is tried instead
(unless the MatMul is already there): the size ladder's."""
SPEED_FALLBACK: dict[str, str] = {"fp32": "nbits8"}
"""The speed ladder's fallback (see :data:`SPEED_LADDER`)."""


def fallback_of(ladder: dict[str, str]) -> dict[str, str]:
    return SPEED_FALLBACK if ladder is SPEED_LADDER else FALLBACK


def initial_plan(graph: LazyGraph, precision: str, scheme: str,
                 smoothed_ranges: dict[str, np.ndarray]) -> dict[str, str]:
    """Where the search starts for every weight MatMul (node name → tier name): the fixed
    recipe's choice, except that int8 activations are per row (``int8-row``) where the recipe
    has per-tensor ones. On the normal 0.6B-shape checkpoint that alone moved the calibration
    min cosine from 0.9977 to 0.9985 for 7 % of the speed (``down_proj`` inputs, heavy-tailed
    per token, measured 0.039 → 0.025 output error), and a text's embedding no longer depends
    on the other texts of its batch through a shared activation scale.

    Args:
        graph: the fp32 graph (smoothing applied or not: only structure is read).
        precision: ``int8`` or ``int4``.
        scheme: the int8 scheme the plan starts from (``quantize.INT8_SCHEMES``).
        smoothed_ranges: calibrated input ranges after smoothing (for the outlier test).
    """
    outliers = set(q.outlier_inputs(smoothed_ranges))
    normed = q.norm_outputs(graph.model)
    plan = {}
    for node in weight_matmuls(graph):
        x, name = node.input[0], node.name
        if precision == "int4":
            wide = name.endswith(q.INT4_8BIT_MATMULS)
            plan[name] = ("nbits8" if x in outliers else "int8-row") if wide else "int4"
        elif scheme == "nbits8":
            plan[name] = "nbits8-128"
        elif scheme == "mixed":
            plan[name] = "nbits8-128" if x in outliers or x not in normed else "int8-row"
        else:
            plan[name] = "fp32" if x in outliers else "int8-row"
    return plan


def plan_bytes(plan: dict[str, str], sizes: dict[str, int]) -> float:
    """Bytes of the planned MatMul weights (``sizes``: node name → weight element count)."""
    return sum(TIERS[tier].bytes_per_weight() * sizes[name] for name, tier in plan.items())


def apply_plan(graph: LazyGraph, plan: dict[str, str]) -> None:
    """Rewrite every weight MatMul of ``graph`` as its tier in ``plan`` says."""
    for tier_name, tier in TIERS.items():
        nodes = [m for m in weight_matmuls(graph) if plan.get(m.name) == tier_name]
        if tier.kind == "nbits":
            rewrite_nbits(graph, nodes, bits=tier.bits, block_size=tier.block_size,
                          accuracy_level=tier.accuracy_level)
        elif tier.kind == "dynamic":
            rewrite_int8(graph, nodes, per_channel=True, per_row=tier.per_row)


def rewrite_embedding_apart(graph: LazyGraph, columns: tuple[int, ...], *,
                            block_size: int = q.EMBEDDING_BLOCK_SIZE) -> str | None:
    """8-bit block embedding table, with ``columns`` kept apart in an fp32 side table.

    Returns:
        The table's name, or None when the graph has no quantizable embedding Gather.
    """
    from onnx import TensorProto, helper

    name = rewrite_embedding(graph, block_size=block_size)
    if name is None or not columns:
        return name
    rows, width = graph.shape(f"{name}.q8")
    cols = list(columns)
    slot = OneSlot()

    def blocks() -> tuple[np.ndarray, np.ndarray]:
        table = graph.read(name)
        table[:, cols] = 0  # the block scales no longer see the outliers
        return embedding_blocks(table, block_size)

    graph.replace(f"{name}.q8", Recipe(TensorProto.UINT8, (rows, width),
                                       lambda: slot.get(name, blocks)[0]))
    graph.replace(f"{name}.scales", Recipe(TensorProto.FLOAT, (rows, width // block_size),
                                           lambda: slot.get(name, blocks)[1]))
    side, place = f"{name}.outlier_columns", f"{name}.outlier_placement"
    graph.replace(side, Recipe(TensorProto.FLOAT, (rows, len(cols)),
                               lambda: graph.read(name)[:, cols]))

    def placement() -> np.ndarray:
        one_hot = np.zeros((len(cols), width), np.float32)
        one_hot[np.arange(len(cols)), cols] = 1.0
        return one_hot

    graph.replace(place, Recipe(TensorProto.FLOAT, (len(cols), width), placement))
    nodes = list(graph.model.graph.node)
    index, gbq = next((i, n) for i, n in enumerate(nodes) if n.op_type == "GatherBlockQuantized"
                      and n.input[0] == f"{name}.q8")
    out = gbq.output[0]
    gbq.output[0] = f"{out}_blocks"
    extra = [
        helper.make_node("Gather", [side, gbq.input[1]], [f"{out}_outliers"],
                         name=f"{name}/outlier_columns/Gather", axis=0),
        helper.make_node("MatMul", [f"{out}_outliers", place], [f"{out}_placed"],
                         name=f"{name}/outlier_columns/MatMul"),
        helper.make_node("Add", [f"{out}_blocks", f"{out}_placed"], [out],
                         name=f"{name}/outlier_columns/Add"),
    ]
    del graph.model.graph.node[:]
    graph.model.graph.node.extend(nodes[:index + 1] + extra + nodes[index + 1:])
    return name


def build_planned(source: Path, target: Path, plan: dict[str, str],
                  smoothing: list[q.Smoothing], ranges: dict[str, np.ndarray],
                  embedding_columns: tuple[int, ...] | None, external: bool) -> list[Path]:
    """Write the graph ``source`` quantized as ``plan`` says to ``target``.

    Args:
        source: the optimized fp32 graph.
        target: the ``.onnx`` file to write.
        plan: node name → tier name (:data:`TIERS`); MatMuls not in it stay fp32.
        smoothing: the smoothing plan to fold in first (may be empty).
        ranges: calibrated ranges of ``source`` (for :func:`quantize.apply_smoothing`).
        embedding_columns: token-embedding columns kept apart (may be empty); ``None`` keeps
            the whole table fp32.
        external: write weights to ``<target>_data``.

    Returns:
        The files written (the model first).
    """
    graph = LazyGraph(source)
    if smoothing:
        q.apply_smoothing(graph, smoothing, ranges)
    apply_plan(graph, plan)
    if embedding_columns is not None:
        rewrite_embedding_apart(graph, embedding_columns)
    return graph.save(target, external=external)


def plan_summary(plan: dict[str, Any]) -> dict[str, int]:
    """How many MatMuls each tier holds."""
    counts: dict[str, int] = {}
    for tier in plan.values():
        counts[tier] = counts.get(tier, 0) + 1
    return dict(sorted(counts.items()))
