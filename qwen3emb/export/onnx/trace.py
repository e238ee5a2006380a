"""Trace a family's embedding graph on the meta device and stream its weights into ONNX.

Tracing never touches real weights, and the writer reads each tensor from its safetensors
shard only when it writes it, so peak memory tracks the largest tensor, not the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import EXTERNAL_DATA_SUFFIX, LAST_HIDDEN_STATE
from qwen3emb.convert.base import Family
from qwen3emb.convert.weights import ShardedWeights
from qwen3emb.errors import OutputError
from qwen3emb.export.onnx.contract import check_graph_contract
from qwen3emb.export.onnx.outputs import add_hidden_state_output
from qwen3emb.export.onnx.replicate import ReplicationError, replicate_layers

logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Weights above 1 GiB go to ``<model>.onnx_data`` (protobuf caps a file at 2 GiB)."""

TRACE_MODES = ("shallow", "full")
"""``shallow``: trace the first layers and replicate the last of them, where the family's
``layer_plan`` allows it for the graph (two layers for text, five for the Qwen3-VL decoder);
``full``: trace every layer."""


def trace_graph(family: Family, spec: Any, dimensions: int | None = None, *,
                trace: str = "shallow") -> Any:
    """Trace one graph of the family with meta weights → an ``onnx_ir.Model`` without weight data.

    Args:
        family: the checkpoint's family.
        spec: the graph contract (one of :meth:`Family.graph_specs`).
        dimensions: Matryoshka width baked into the embedding graph.
        trace: ``"shallow"`` traces the first layers (plus the pooled last layer, see
            ``Family.pooled_last_layer``) and copies the last of them to full depth when the
            family allows it for this graph (``Family.layer_plan``; else it traces them
            all); ``"full"`` always traces every layer.

    Raises:
        OutputError: the exporter failed.
    """
    plan = family.layer_plan(spec.name) if trace == "shallow" else None
    total = family.num_layers
    if plan is not None and total > plan[1] + 1 + plan[2]:
        scope, template, tail = plan
        model = _trace(family, spec, dimensions, template + 1 + tail)
        try:
            replicate_layers(model, scope, total, tail, template=template)
            return model
        except ReplicationError as e:
            logger.warning("cannot replicate the traced layers (%s); tracing all %d", e, total)
    return _trace(family, spec, dimensions, None)


def _trace(family: Family, spec: Any, dimensions: int | None, num_layers: int | None) -> Any:
    import torch

    backbone = family.meta_backbone(num_layers)
    module = family.graph_module(backbone, spec.name, dimensions)
    example, dynamic = family.trace_inputs(spec.name, spec)
    example = tuple(t.to("meta") for t in example)
    captured = io.StringIO()
    logger.info("tracing the %s graph of %s (%s layers) with torch.onnx (dynamo, opset %d)",
                spec.name, family.model_type, num_layers or "all", spec.opset)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(captured):
            program = torch.onnx.export(
                module, example, dynamo=True, input_names=spec.input_names,
                output_names=traced_outputs(spec), opset_version=spec.opset,
                dynamic_shapes=dynamic, optimize=False, verbose=False,
            )
    except Exception as e:
        logger.debug("exporter output:\n%s", captured.getvalue())
        raise OutputError(
            f"torch.onnx.export of the {spec.name} graph failed: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200]}",
            hint="Run with QWEN3EMB_DEBUG=1 for the traceback; check torch/transformers versions",
        ) from e
    if program is None:  # only the legacy exporter returns None
        raise OutputError("torch.onnx.export returned no program",
                          hint="This is a bug in qwen3emb-export; please report it")
    model = program.model
    name_axes(model, spec)
    model.graph.meta["graph"] = spec.name
    model.graph.meta["host_buffers"] = family.host_buffers(backbone)
    model.graph.meta["nan_free_softmax"] = bool(getattr(module, "nan_free_softmax", False))
    return model


def name_axes(model: Any, spec: Any) -> None:
    """Rename the graph's dynamic I/O axes to the spec's names.

    The exporter names derived axes after its symbols (``4*blocks``, ``groups*s79``); the
    contract names them (``patches``, ``visual_tokens``). Axes already named right are left
    alone.
    """
    import onnx_ir as ir

    graph = model.graph
    for values, tensors in ((graph.inputs, spec.inputs), (graph.outputs, spec.outputs)):
        for value, tensor in zip(values, tensors):
            if value.shape is None or len(value.shape) != len(tensor.axes):
                continue
            dims = list(value.shape)
            renamed = [ir.SymbolicDim(axis) if not axis.isdigit() and not isinstance(dim, int)
                       and dim.value != axis else dim for dim, axis in zip(dims, tensor.axes)]
            if any(a is not b for a, b in zip(renamed, dims)):
                value.shape = ir.Shape(renamed)


def traced_outputs(spec: Any) -> list[str]:
    """The outputs the torch module returns: ``last_hidden_state`` is added to the graph after
    tracing (:func:`qwen3emb.export.onnx.outputs.add_hidden_state_output`)."""
    return [name for name in spec.output_names if name != LAST_HIDDEN_STATE]


def drop_nan_guards(model: Any) -> int:
    """Remove the ``Where(IsNaN(p), 0, p)`` that torch's sdpa export puts after each Softmax.

    The guard turns the NaN of a softmax over a fully masked row into zeros. Only for graphs
    whose module guarantees that no row is fully masked (``nan_free_softmax``, recorded by
    :func:`trace_graph`): there it is a no-op that costs a pass over every attention matrix.

    Returns:
        How many guards were removed.
    """
    import onnx_ir as ir

    graph = model.graph
    dropped = 0
    for isnan in [n for n in graph if n.op_type == "IsNaN" and n.domain in ("", "ai.onnx")]:
        probs, flags = isnan.inputs[0], isnan.outputs[0]
        source = None if probs is None else probs.producer()
        if source is None or source.op_type != "Softmax":
            continue
        guards = [user for user, _ in flags.uses()]
        if not guards or any(g.op_type != "Where" or g.inputs[0] is not flags
                             or g.inputs[2] is not probs or g.outputs[0].is_graph_output()
                             for g in guards):
            continue
        for guard in guards:
            ir.convenience.replace_all_uses_with(guard.outputs[0], probs)
            graph.remove(guard, safe=True)
        graph.remove(isnan, safe=True)
        dropped += 1
    return dropped


def attach_weights(model: Any, family: Family,
                   source: ShardedWeights | dict[str, np.ndarray]) -> int:
    """Give every initializer of a meta-traced model its data.

    Args:
        model: from :func:`trace_graph`.
        family: maps initializer names to checkpoint tensor names.
        source: shards to stream from (lazy), or in-memory fp32 arrays keyed like the shards.

    Returns:
        Total bytes of fp32 weight data.

    Raises:
        OutputError: an initializer has no tensor in the checkpoint.
    """
    import onnx_ir as ir

    buffers: dict[str, np.ndarray] = model.graph.meta.get("host_buffers", {})
    graph = model.graph.meta.get("graph", "model")
    total = 0
    missing: list[str] = []
    for name, value in model.graph.initializers.items():
        inner = family.backbone_name(graph, name)
        if inner in buffers:
            value.const_value = ir.tensor(buffers[inner], name=name)
            total += buffers[inner].nbytes
            continue
        key = family.checkpoint_key(inner, source)
        if key is None:
            missing.append(inner)
            continue
        if isinstance(source, ShardedWeights):
            if tuple(source.shape(key)) != tuple(value.shape):
                raise OutputError(f"checkpoint tensor '{key}' has shape {source.shape(key)}, the "
                                  f"config implies {tuple(value.shape)}",
                                  hint="config.json does not match the weights")
            value.const_value = ir.LazyTensor(_loader(source, key), dtype=ir.DataType.FLOAT,
                                              shape=value.shape, name=name)
            total += source.nbytes(key)
        else:
            value.const_value = ir.tensor(np.ascontiguousarray(source[key], np.float32), name=name)
            total += source[key].size * 4
    if missing:
        raise OutputError(f"the checkpoint lacks tensors the graph needs: {missing[:5]}",
                          hint="The checkpoint is incomplete or does not match config.json")
    return total


def _loader(source: ShardedWeights, key: str) -> Callable[[], Any]:
    import onnx_ir as ir

    return lambda: ir.tensor(source.load(key))


def fold_weight_transposes(model: Any) -> int:
    """Replace ``Transpose(W)`` of a 2-D weight initializer by an initializer holding ``W.T``.

    onnxscript's constant folding would do the same, but eagerly, holding every transposed
    weight in memory at once. Here a streamed weight stays lazy: it is read and transposed
    only when the writer reaches it.

    Returns:
        How many transposes were folded.
    """
    import onnx_ir as ir

    folded = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[0]
        if weight is None or not weight.is_initializer() or len(weight.uses()) != 1:
            continue
        source = weight.const_value
        perm = node.attributes.get("perm")
        if source is None or len(source.shape) != 2 or (perm and list(perm.as_ints()) != [1, 0]):
            continue
        shape = ir.Shape([source.shape[1], source.shape[0]])
        if isinstance(source, ir.LazyTensor):
            weight.const_value = ir.LazyTensor(_transposed(source), dtype=source.dtype,
                                               shape=shape, name=weight.name)
        else:
            weight.const_value = ir.tensor(np.ascontiguousarray(source.numpy().T),
                                           name=weight.name)
        weight.shape = shape
        node.outputs[0].replace_all_uses_with(weight)
        model.graph.remove(node, safe=True)
        folded += 1
    return folded


def _transposed(source: Any) -> Callable[[], Any]:
    import onnx_ir as ir

    return lambda: ir.tensor(np.ascontiguousarray(source.numpy().T))


SKIPPED_REWRITES = ("SlicesSplit",)
"""onnxscript default rewrite rules left out. SlicesSplit is the one rule with two output
nodes, and onnxscript matches those by scanning the whole graph for every node: quadratic,
~60 s of a 28-layer export here, against ~5 s for all the other passes. It turns two Slices
into a Split only when the second one ends at the static last dimension; the exporter writes
``x[..., d // 2:]`` with an open end, so it never applies to these graphs (a test checks that
skipping it leaves the optimized graph byte-identical)."""


def optimize_graph(model: Any, *, skip: tuple[str, ...] = SKIPPED_REWRITES) -> None:
    """onnxscript's default optimization, minus initializer deduplication and ``skip``.

    Deduplication hashes every initializer, which would read (and, in onnx_ir, keep) every
    streamed weight; Qwen3 graphs have no duplicate weights to find. Constant folding only
    reads inputs under its size limit, so large weights stay lazy.

    Args:
        model: the ``onnx_ir.Model`` to optimize in place.
        skip: names of default rewrite rules not to apply (see :data:`SKIPPED_REWRITES`).
    """
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) not in skip]
    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                ),
                rewriter.RewritePass(rules),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def export_onnx(
    family: Family,
    out_path: Path,
    spec: Any,
    *,
    dimensions: int | None = None,
    weights: str = "stream",
    trace: str = "shallow",
    progress: bool = False,
) -> Path:
    """Export one graph of the family to ``out_path`` in fp32, with the spec's dynamic axes.

    Args:
        family: the checkpoint's family.
        out_path: the ``.onnx`` file; large weights go beside it as ``<name>_data``.
        spec: the graph contract (one of :meth:`Family.graph_specs`: names, axes, opset).
        dimensions: Matryoshka width baked into the embedding graph (``None`` = full width).
        weights: ``"stream"`` reads each tensor from its shard while writing (flat memory);
            ``"memory"`` loads the whole fp32 model first (the naive path, kept to prove that
            both give the same bytes).
        trace: ``"shallow"`` (trace two layers, copy the second to full depth, when the
            family's layers are uniform) or ``"full"`` (trace every layer; the naive path).
        progress: show bars for tracing and for writing the weights.

    Returns:
        ``out_path``.

    Raises:
        OutputError: tracing failed, a tensor is missing, or the graph breaks its contract.
        InputError: unknown ``weights`` or ``trace`` mode.
    """
    import onnx_ir as ir

    from qwen3emb.errors import InputError

    if weights not in ("stream", "memory"):
        raise InputError(f"unknown weights mode '{weights}'", hint="Use 'stream' or 'memory'")
    if trace not in TRACE_MODES:
        raise InputError(f"unknown trace mode '{trace}'", hint="Use 'shallow' or 'full'")
    from qwen3emb.progress import bar

    with bar(1, "trace graph (meta)", progress, unit="graph") as tracing:
        model = trace_graph(family, spec, dimensions, trace=trace)
        tracing.update(1)
    shards = ShardedWeights(family.checkpoint.weight_files)
    if weights == "memory":
        backbone = family.load_backbone()
        state = {k: v.detach().numpy() for k, v in backbone.state_dict().items()}
        source: ShardedWeights | dict[str, np.ndarray] = {
            key: state[inner] for inner in state
            if (key := family.checkpoint_key(inner, shards)) is not None}
    else:
        source = shards
    total = attach_weights(model, family, source)
    fold_weight_transposes(model)
    optimize_graph(model)
    if getattr(spec, "hidden_state_output", False):
        add_hidden_state_output(model)
    if model.graph.meta.get("nan_free_softmax"):
        logger.info("dropped %d softmax NaN guards (no attention row is empty)",
                    drop_nan_guards(model))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    external = total > EXTERNAL_DATA_THRESHOLD
    data_name = out_path.name + EXTERNAL_DATA_SUFFIX
    logger.info("writing %s (%.1f MB of fp32 weights%s)", out_path, total / 1e6,
                ", external data" if external else "")
    with bar(total, f"write {out_path.name}", progress and external, unit="B") as writing:
        if external:
            ir.save(model, os.fspath(out_path), external_data=data_name,
                    callback=lambda tensor, info: writing.update(int(tensor.nbytes)))
        else:
            ir.save(model, os.fspath(out_path))
    shards.close()
    check_graph_contract(out_path, spec)
    return out_path
