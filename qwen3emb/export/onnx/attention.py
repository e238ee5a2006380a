"""Attention that never holds a (heads × seq × seq) tensor: the exporter's sdpa, rewritten
as a loop over query blocks.

torch's sdpa exports as ``Softmax(Q·Kᵀ + mask)·V`` over the whole sequence: at 8192 tokens the
0.6B's 16 heads make each score tensor 4.3 GB, and several are alive at once (scores, masked
scores, probabilities), so one 8K text needed 22.9 GB and 32K could not run. onnxruntime's CPU
kernels do not help here: ``GroupQueryAttention``, ``MultiHeadAttention`` with a mask and the
opset-23 ``Attention`` all allocate the full probability buffer (measured in
``scripts/bench_attention.py``); only ``MultiHeadAttention`` without any mask uses a flash
kernel, and a causal, padded decoder needs a mask.

So each full-sequence attention becomes an ONNX ``Loop`` over blocks of ``BLOCK`` query rows.
Block ``i`` reads queries ``[i·BLOCK, end)`` and, when the attention is causal, only keys
``[0, end)``: every later key is masked for these rows anyway, so the result is the same and
about half of the causal FLOPs are skipped. The block's mask is built inside the loop from the
graph's 2-D ``attention_mask`` (key is real, or is the row itself; and ``key ≤ row`` when
causal), exactly the mask the traced module used, so padding side, positions and batch
independence are untouched. Grouped-query heads are read through a reshape of the query
([batch, kv_heads, groups·rows, head_dim]) instead of the exporter's repeated keys and values.
Peak attention memory is ``batch × heads × BLOCK × seq`` floats (0.5 GB for the 0.6B at 32K).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from qwen3emb.export.onnx.graph import GraphIndex, remove_dead_nodes, replace_nodes

logger = logging.getLogger(__name__)

BLOCK = 256
"""Query rows per loop iteration (``scripts/bench_attention.py`` sweeps it)."""

PREFIX = "attention/"
"""Every node this rewrite adds is named under it: the fp16 converter keeps them in fp32."""


@dataclass(frozen=True)
class AttentionSite:
    """One full-sequence attention found in the graph: the exporter's nodes and the tensors
    the blocked form reads."""

    query: str          # [batch, heads, seq, head_dim], rotary applied, not yet scaled
    key: str            # [batch, kv_heads, seq, head_dim], before any repetition
    value: str          # [batch, kv_heads, seq, head_dim]
    output: str         # [batch, heads, seq, head_dim]
    scale: float        # applied to Q·Kᵀ
    causal: bool
    nodes: tuple[int, ...]  # indices of the nodes the rewrite replaces (score path only)


class _Builder:
    """Nodes and constants of one rewrite, named under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def __call__(self, op: str, inputs: list[str], **attrs: Any) -> str:
        import onnx

        self.count += 1
        name = f"{self.prefix}/{op}_{self.count}"
        self.nodes.append(onnx.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(self, key: str, value: Any, dtype: Any = None) -> str:
        import numpy as np
        from onnx import numpy_helper

        name = f"{self.prefix}/{key}"
        array = np.asarray(value, dtype=dtype or np.int64)
        self.inits.append(numpy_helper.from_array(array, name))
        return name


def _tensor(value: float) -> Any:
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value, np.float32))


def shared_inputs(attention_mask: str | None, block: int = BLOCK, *,
                  seq_from: str | None = None) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """The per-graph tensors every blocked attention reads: the key mask as booleans, the
    sequence length, the block length (``min(block, seq)``, so a short input is one block
    with no padding) and the block count.

    Args:
        attention_mask: the graph's [batch, seq] mask input; ``None`` for attention with no
            mask (every key is real), whose sequence length is axis 2 of ``seq_from``.
        block: query rows per iteration.
        seq_from: a [batch, heads, seq, head_dim] tensor, when there is no mask.

    Returns:
        (nodes, initializers, names): ``names`` maps ``keys``, ``seq``, ``seq_1d``,
        ``block``, ``block_1d``, ``blocks`` and the constants the loop bodies use to tensors.
    """
    import numpy as np
    import onnx

    b = _Builder(f"{PREFIX}shared")
    names = {"zero": b.const("zero", [0]), "s0": b.const("s0", 0), "s1": b.const("s1", 1),
             "zeros8": b.const("zeros8", [0] * 8), "zeros1": b.const("zeros1", [0])}
    for axis in range(5):
        names[f"axis{axis}"] = b.const(f"axis{axis}", [axis])
    names["axes12"] = b.const("axes12", [1, 2])
    # An explicit loop condition: onnx's reference evaluator runs no iteration without one.
    names["true"] = b.const("true", True, np.bool_)
    if attention_mask is not None:
        names["keys"] = b("Cast", [attention_mask], to=onnx.TensorProto.BOOL)
        names["seq_1d"] = b("Shape", [attention_mask], start=1, end=2)
        names["batch_1d"] = b("Shape", [attention_mask], start=0, end=1)
    else:
        names["keys"] = None
        names["seq_1d"] = b("Shape", [seq_from], start=2, end=3)
        names["batch_1d"] = b("Shape", [seq_from], start=0, end=1)
    names["block_1d"] = b("Min", [names["seq_1d"], b.const("block", [block])])
    names["seq"] = b("Squeeze", [names["seq_1d"], names["axis0"]])
    names["block"] = b("Squeeze", [names["block_1d"], names["axis0"]])
    longer = b("Sub", [b("Add", [names["seq"], names["block"]]), names["s1"]])
    names["blocks"] = b("Div", [longer, names["block"]])          # ceil(seq / block)
    return b.nodes, b.inits, names


def blocked_attention(site: AttentionSite, shared: dict[str, str], *, heads: int,
                      kv_heads: int, head_dim: int, prefix: str) -> tuple[list[Any], list[Any]]:
    """The nodes computing ``site.output`` as a ``Loop`` over query blocks.

    Args:
        site: the attention to replace (its tensors and scale).
        shared: the names from :func:`shared_inputs`.
        heads, kv_heads, head_dim: the attention's geometry (heads a multiple of kv_heads).
        prefix: names of the new nodes and constants start with it.

    Returns:
        (nodes, initializers) for the main graph; the last node writes ``site.output``.
    """
    import numpy as np
    import onnx

    groups = heads // kv_heads
    s = shared
    outer = _Builder(prefix)
    # [batch, kv_heads, groups, seq, head_dim]: the query heads that share a key/value head.
    q5 = outer("Reshape", [site.query,
                           outer.const("q5_shape", [0, kv_heads, groups, -1, head_dim])])
    kt = outer("Unsqueeze", [outer("Transpose", [site.key], perm=[0, 1, 3, 2]), s["axis2"]])
    v5 = outer("Unsqueeze", [site.value, s["axis2"]])   # [batch, kv, 1, seq, head_dim]
    body = _Builder(f"{prefix}/block")
    # Float constants live in the body, so the fp16 converter, which keeps these nodes in
    # fp32 and does not enter their body, finds no outer float constant to convert.
    scale = body("Constant", [], value=_tensor(site.scale))
    neg_inf = body("Constant", [], value=_tensor(-np.inf))
    zero_f = body("Constant", [], value=_tensor(0.0))
    i, cond = f"{prefix}/i", f"{prefix}/cond"
    start = body("Mul", [i, s["block"]])
    end = body("Min", [body("Add", [start, s["block"]]), s["seq"]])
    start_1d = body("Unsqueeze", [start, s["axis0"]])
    end_1d = body("Unsqueeze", [end, s["axis0"]])
    # Causal: keys after the block's last row are masked for every row of it, so skip them.
    key_end, key_end_1d = (end, end_1d) if site.causal else (s["seq"], s["seq_1d"])
    q = body("Slice", [q5, start_1d, end_1d, s["axis3"]])           # [b, kv, g, rows, d]
    k = body("Slice", [kt, s["zero"], key_end_1d, s["axis4"]])      # [b, kv, 1, d, keys]
    v = body("Slice", [v5, s["zero"], key_end_1d, s["axis3"]])      # [b, kv, 1, keys, d]
    scores = body("Mul", [body("MatMul", [q, k]), scale])           # [b, kv, g, rows, keys]
    if s["keys"] is not None:
        rows = body("Unsqueeze", [body("Range", [start, end, s["s1"]]), s["axis1"]])  # [rows, 1]
        cols = body("Unsqueeze", [body("Range", [s["s0"], key_end, s["s1"]]), s["axis0"]])
        real = body("Slice", [s["keys"], s["zero"], key_end_1d, s["axis1"]])
        real = body("Unsqueeze", [real, s["axis1"]])                # [b, 1, keys]
        # The traced module's mask: a real key, or the row itself (so no row is empty).
        allowed = body("Or", [real, body("Equal", [rows, cols])])  # [b, rows, keys]
        if site.causal:
            allowed = body("And", [allowed, body("LessOrEqual", [cols, rows])])
        allowed = body("Unsqueeze", [allowed, s["axes12"]])         # [b, 1, 1, rows, keys]
        # The mask as an additive bias on the small tensor, then one broadcast Add: exact
        # (x + 0 is x, x + -inf is -inf), and onnxruntime's broadcast Where over the scores
        # was the slowest node of the loop (76 of 204 ms at 2048 tokens, one layer).
        bias = body("Where", [allowed, zero_f, neg_inf])
        scores = body("Add", [scores, bias])
    probs = body("Softmax", [scores], axis=-1)
    out = body("MatMul", [probs, v])                                # [b, kv, g, rows, d]
    # A short last block is padded to the block length so every iteration's output has one
    # shape (Loop stacks them); the padding is cut after the loop.
    short = body("Sub", [s["block_1d"], body("Sub", [end_1d, start_1d])])
    # Pads of a 5-D tensor: 5 begins and 3 ends of zeros, then the rows axis, then 0.
    padded = body("Pad", [out, body("Concat", [s["zeros8"], short, s["zeros1"]], axis=0)])
    keep = body("Identity", [cond])
    graph = onnx.helper.make_graph(
        body.nodes, f"{prefix}/body",
        [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.INT64, []),
         onnx.helper.make_tensor_value_info(cond, onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info(keep, onnx.TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info(padded, onnx.TensorProto.FLOAT, [None] * 5)])
    stacked = outer("Loop", [s["blocks"], s["true"]], body=graph)
    # onnxruntime stacks the blocks on a new axis, onnx's reference evaluator concatenates
    # them on axis 0: one explicit shape reads both as [n, b, kv, g, blk, d].
    blocks_shape = outer("Concat", [outer.const("minus1", [-1]), s["batch_1d"],
                                    outer.const("kv_groups", [kv_heads, groups]),
                                    s["block_1d"], outer.const("head_dim", [head_dim])], axis=0)
    stacked = outer("Reshape", [stacked, blocks_shape])
    joined = outer("Transpose", [stacked], perm=[1, 2, 3, 0, 4, 5])
    flat = outer("Reshape", [joined, outer.const("out_shape", [0, heads, -1, head_dim])])
    outer.nodes.append(onnx.helper.make_node(
        "Slice", [flat, s["zero"], s["seq_1d"], s["axis2"]], [site.output],
        name=f"{prefix}/Slice_out"))
    return outer.nodes, outer.inits


REPEAT_OPS = ("Reshape", "Transpose", "Expand", "Unsqueeze")
"""Ops between a key/value head and the matrix sdpa multiplies (repeat_kv, the transpose)."""


def _shapes(model: Any) -> dict[str, list[Any]]:
    """Each tensor's recorded shape (ints and axis names) from the graph's value_info."""
    out = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        out[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param
                           for d in dims]
    return out


def _head_source(g: Any, tensor: str, shapes: dict[str, list[Any]], seq: Any,
                 head_dim: int) -> str | None:
    """The [batch, kv_heads, seq, head_dim] tensor that ``tensor`` repeats and/or transposes:
    the input of repeat_kv's Unsqueeze, or the first 4-D [batch, heads, seq, head_dim]
    tensor up the chain when no head is repeated."""
    first = None
    for _ in range(12):
        shape = shapes.get(tensor)
        if first is None and shape and len(shape) == 4 and shape[2:] == [seq, head_dim]:
            first = tensor
        node = g.producer.get(tensor)
        if node is None or node.op_type not in REPEAT_OPS:
            return first
        if node.op_type == "Unsqueeze" and any(u.op_type == "Expand"
                                               for u in g.consumers[node.output[0]]):
            return node.input[0]
        tensor = node.input[0]
    return first


def find_sites(model: Any, *, causal: bool) -> list[AttentionSite]:
    """The full-sequence attentions of the graph, as torch's sdpa exports them:
    ``Softmax(MatMul(Q·c, Kᵀ·c) + Where(mask, 0, -inf)) · V`` (``causal``: a decoder whose
    mask is causal and padded, as the traced module builds it) or, without a mask,
    ``Softmax(MatMul(Q·c, Kᵀ·c)) · V`` (a vision tower's bidirectional attention; then
    ``causal`` must be False). A query whose rows are not the sequence (the pooled last
    layer's single row) is left alone.
    """

    g = GraphIndex(model.graph)
    shapes = _shapes(model)
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    sites = []
    for softmax in model.graph.node:
        if softmax.op_type != "Softmax":
            continue
        nodes = [softmax]
        scores = g.producer.get(softmax.input[0])
        if scores is not None and scores.op_type == "Add":
            bias = next((g.producer.get(t) for t in scores.input
                         if getattr(g.producer.get(t), "op_type", "") == "Where"), None)
            matmul = next((g.producer.get(t) for t in scores.input
                           if getattr(g.producer.get(t), "op_type", "") == "MatMul"), None)
            if bias is None or matmul is None or not causal:
                continue
            nodes += [scores, bias]
        elif scores is not None and scores.op_type == "MatMul" and not causal:
            matmul = scores
        else:
            continue
        nodes.append(matmul)
        scale, operands = 1.0, []
        for operand in matmul.input:
            mul = g.producer.get(operand)
            value = None
            if mul is not None and mul.op_type == "Mul":
                value = next((g.const(t) for t in mul.input if g.const(t) is not None), None)
            if value is not None and value.size == 1:
                scale *= float(value)
                operands.append(next(t for t in mul.input if g.const(t) is None))
                nodes.append(mul)
            else:
                operands.append(operand)
        probs = softmax.output[0]
        users = g.consumers[probs]
        guard = [u for u in users if u.op_type in ("IsNaN", "Where")]
        if guard:  # Where(IsNaN(p), 0, p): a no-op here, no row is empty
            where = next((u for u in users if u.op_type == "Where"), None)
            if where is None or len(users) != 2:
                continue
            nodes += guard
            probs, users = where.output[0], g.consumers[where.output[0]]
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != probs:
            continue
        out = users[0]
        nodes.append(out)
        query = operands[0]
        q_shape = shapes.get(query) or []
        if len(q_shape) != 4 or isinstance(q_shape[2], int) or not isinstance(q_shape[3], int):
            continue  # the pooled layer's query has one row, not the sequence
        seq, head_dim = q_shape[2], q_shape[3]
        key = _head_source(g, operands[1], shapes, seq, head_dim)
        value = _head_source(g, out.input[1], shapes, seq, head_dim)
        if key is None or value is None or shapes[key][1] != shapes[value][1]:
            continue
        sites.append(AttentionSite(query=query, key=key, value=value, output=out.output[0],
                                   scale=scale, causal=causal,
                                   nodes=tuple(sorted(index[id(n)] for n in nodes))))
    return sites


def block_attention(model: Any, *, causal: bool = True, block: int = BLOCK) -> int:
    """Rewrite every full-sequence attention of ``model`` (an ``onnx.ModelProto``, in place)
    as a loop over query blocks (see the module docstring).

    Args:
        model: an exported decoder (``causal``; reads the graph input ``attention_mask``)
            or vision tower (not causal, no mask).
        causal: the attention is causal and masked by ``attention_mask``.
        block: query rows per iteration.

    Returns:
        How many attentions were rewritten.
    """

    sites = find_sites(model, causal=causal)
    if not sites:
        return 0
    shapes = _shapes(model)
    nodes, inits, shared = (shared_inputs("attention_mask", block) if causal
                            else shared_inputs(None, block, seq_from=sites[0].query))
    drop: set[int] = set()
    extra: list[Any] = list(nodes)
    for k, site in enumerate(sites):
        heads, head_dim = shapes[site.query][1], shapes[site.query][3]
        built, constants = blocked_attention(site, shared, heads=heads,
                                             kv_heads=shapes[site.key][1], head_dim=head_dim,
                                             prefix=f"{PREFIX}{k}")
        inits += constants
        drop.update(site.nodes)
        extra += built
    model.graph.initializer.extend(inits)
    model.graph.node.extend(extra)
    replace_nodes(model, drop, {})  # drops the sdpa nodes and re-sorts topologically
    removed = remove_dead_nodes(model)
    logger.info("blocked %d attentions (%d query rows a block); %d dead nodes removed",
                len(sites), block, removed)
    return len(sites)
