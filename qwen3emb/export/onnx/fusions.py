"""Fusions of the exported fp32 graph into onnxruntime's fused CPU kernels, and the names
the quantizers select MatMuls by (see :mod:`qwen3emb.export.onnx.optimize`)."""

from __future__ import annotations

import math
from typing import Any

from qwen3emb.export.onnx.graph import MS_DOMAIN, GraphIndex, other_input, replace_nodes

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_PROJECTIONS = ("attn.qkv", "attn.proj", "linear_fc1", "linear_fc2")
"""Qwen3-VL vision tower Linears (blocks and patch mergers): their nodes are named too, their
weights keep the names the exporter gave them (already the module's)."""


def name_projections(model: Any) -> int:
    """Rename projection MatMuls and their weights after the torch module they came from.

    The exporter folds ``linear`` weights into anonymous transposed initializers (``val_77``);
    its node metadata still records the module. Weights become ``<module>.weight_t`` and nodes
    ``<module>/MatMul``, e.g. ``backbone.layers.0.mlp.down_proj/MatMul``.

    Returns:
        How many MatMuls were named.
    """
    g = GraphIndex(model.graph)
    renamed: dict[str, str] = {}
    count = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in g.inits:
            continue
        scopes = {p.key: p.value for p in node.metadata_props}.get(SCOPES_KEY, "")
        modules = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
        module = next((m for m in modules if m.endswith(PROJECTIONS + VISION_PROJECTIONS)),
                      None)
        if module is None:
            continue
        node.name = f"{module}/MatMul"
        weight = node.input[1]
        if (not module.endswith(VISION_PROJECTIONS) and len(g.consumers[weight]) == 1
                and weight not in renamed):
            renamed[weight] = f"{module}.weight_t"
        count += 1
    for init in model.graph.initializer:
        if init.name in renamed:
            init.name = renamed[init.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    return count


def fuse_rms_norms(model: Any) -> int:
    """Replace ``w * (x * 1/sqrt(mean(x^2) + eps))`` with ``SimplifiedLayerNormalization``.

    Returns:
        How many norms were fused.
    """
    import numpy as np
    import onnx

    g = GraphIndex(model.graph)
    drop: set[int] = set()
    new_nodes: dict[int, Any] = {}
    for pow_node in model.graph.node:
        if pow_node.op_type != "Pow":
            continue
        exponent = g.const(pow_node.input[1])
        if exponent is None or exponent.size != 1 or float(exponent) != 2.0:
            continue
        x = pow_node.input[0]
        mean = g.only_consumer(pow_node.output[0], "ReduceMean")
        if mean is None or len(mean.input) < 2:
            continue
        axes = g.const(mean.input[1])
        keep = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
        if axes is None or list(np.ravel(axes)) != [-1] or keep != 1:
            continue
        add = g.only_consumer(mean.output[0], "Add")
        eps = None if add is None else g.const(other_input(add, mean.output[0]))
        sqrt = None if add is None else g.only_consumer(add.output[0], "Sqrt")
        recip = None if sqrt is None else g.only_consumer(sqrt.output[0], "Reciprocal")
        scale = None if recip is None else g.only_consumer(recip.output[0], "Mul")
        if (eps is None or scale is None or recip is None
                or other_input(scale, recip.output[0]) != x):
            continue
        weigh = g.only_consumer(scale.output[0], "Mul")
        weight = None if weigh is None else other_input(weigh, scale.output[0])
        if weight is None or weight not in g.inits or len(g.inits[weight].dims) != 1:
            continue
        chain = (pow_node, mean, add, sqrt, recip, scale, weigh)
        fused = onnx.helper.make_node(
            "SimplifiedLayerNormalization", [x, weight], [weigh.output[0]],
            name=f"{weight.removesuffix('.weight')}/SimplifiedLayerNormalization",
            axis=-1, epsilon=float(eps), stash_type=1)
        index = {id(n): i for i, n in enumerate(model.graph.node)}
        for n in chain:
            drop.add(index[id(n)])
        new_nodes[index[id(weigh)]] = fused
    replace_nodes(model, drop, new_nodes)
    return len(new_nodes)


def fuse_skip_norms(model: Any) -> int:
    """Fold each residual ``Add`` that feeds a norm into ``SkipSimplifiedLayerNormalization``.

    The fused node's fourth output is the residual sum, which replaces the Add's output for
    every other consumer (the next residual Add).

    Returns:
        How many were fused.
    """
    import onnx

    g = GraphIndex(model.graph)
    drop: set[int] = set()
    new_nodes: dict[int, Any] = {}
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    for norm in model.graph.node:
        if norm.op_type != "SimplifiedLayerNormalization":
            continue
        add = g.producer.get(norm.input[0])
        if add is None or add.op_type != "Add" or any(a in g.inits for a in add.input):
            continue
        if any(g.const(a) is not None for a in add.input) or add.output[0] in g.outputs:
            continue
        epsilon = next(a.f for a in norm.attribute if a.name == "epsilon")
        users = [u for u in g.consumers[add.output[0]] if u is not norm]
        total = add.output[0] if users else ""
        fused = onnx.helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", total],
            name=norm.name.replace("SimplifiedLayer", "SkipSimplifiedLayer"),
            domain=MS_DOMAIN, epsilon=epsilon)
        drop.add(index[id(add)])
        drop.add(index[id(norm)])
        new_nodes[index[id(norm)]] = fused
    replace_nodes(model, drop, new_nodes, microsoft=True)
    return len(new_nodes)


def _scalar(g: GraphIndex, name: str, value: float) -> bool:
    array = g.const(name)
    return array is not None and array.size == 1 and abs(float(array) - value) < 1e-5


def _gelu_tail(g: GraphIndex, node: Any, x: str) -> list[Any] | None:
    """``Add(1) → Mul(0.5) → Mul(x)`` after ``node`` (the Tanh or Erf), or None."""
    add = g.only_consumer(node.output[0], "Add")
    if add is None or not _scalar(g, other_input(add, node.output[0]), 1.0):
        return None
    half = g.only_consumer(add.output[0], "Mul")
    if half is None or not _scalar(g, other_input(half, add.output[0]), 0.5):
        return None
    last = next((u for u in g.consumers[half.output[0]] if u.op_type == "Mul"), None)
    if (last is None or len(g.consumers[half.output[0]]) != 1
            or other_input(last, half.output[0]) != x):
        return None
    return [add, half, last]


def _tanh_gelu(g: GraphIndex, node: Any) -> list[Any] | None:
    """The nodes of ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` from its Pow."""

    if node.op_type != "Pow" or not _scalar(g, node.input[1], 3.0):
        return None
    x = node.input[0]
    cube = g.only_consumer(node.output[0], "Mul")
    inner = None if cube is None else g.only_consumer(cube.output[0], "Add")
    scale = None if inner is None else g.only_consumer(inner.output[0], "Mul")
    tanh = None if scale is None else g.only_consumer(scale.output[0], "Tanh")
    if (cube is None or inner is None or scale is None or tanh is None
            or not _scalar(g, other_input(cube, node.output[0]), 0.044715)
            or other_input(inner, cube.output[0]) != x
            or not _scalar(g, other_input(scale, inner.output[0]), math.sqrt(2 / math.pi))):
        return None
    tail = _gelu_tail(g, tanh, x)
    return None if tail is None else [node, cube, inner, scale, tanh, *tail]


def _erf_gelu(g: GraphIndex, node: Any) -> list[Any] | None:
    """The nodes of ``0.5 x (1 + erf(x / sqrt 2))`` from its Div."""

    if node.op_type != "Div" or not _scalar(g, node.input[1], math.sqrt(2)):
        return None
    erf = g.only_consumer(node.output[0], "Erf")
    tail = None if erf is None else _gelu_tail(g, erf, node.input[0])
    return None if tail is None else [node, erf, *tail]


def fuse_gelus(model: Any) -> int:
    """Replace the exporter's elementwise GELUs with onnxruntime's ``com.microsoft`` kernels:
    the tanh form ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (the Qwen3-VL vision
    blocks' ``gelu_pytorch_tanh``) with ``FastGelu``, the erf form
    ``0.5 x (1 + erf(x / sqrt 2))`` (its patch mergers' ``nn.GELU``) with ``Gelu``.

    onnxruntime's own GELU fusions do not match the exporter's operand order. Unfused, the
    tanh form is nine elementwise passes over each MLP's widest activation: 27.7 ms against
    6.6 ms for ``FastGelu`` on [784, 4096] (2 threads), ~0.5 s of a 448x448 image on the 2B.

    Returns:
        How many were fused.
    """
    import onnx

    g = GraphIndex(model.graph)
    drop: set[int] = set()
    new_nodes: dict[int, Any] = {}
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    for node in model.graph.node:
        x = node.input[0] if node.input else ""
        op, chain = "FastGelu", _tanh_gelu(g, node)
        if chain is None:
            op, chain = "Gelu", _erf_gelu(g, node)
        if chain is None:
            continue
        last = chain[-1]
        for n in chain:
            drop.add(index[id(n)])
        new_nodes[index[id(last)]] = onnx.helper.make_node(
            op, [x], [last.output[0]], name=f"{last.name}/{op}", domain=MS_DOMAIN)
    replace_nodes(model, drop, new_nodes, microsoft=True)
    return len(new_nodes)
