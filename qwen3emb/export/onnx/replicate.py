"""Grow a shallow traced graph to full depth by copying its last decoder layer.

Tracing costs grow with depth (the dynamo exporter takes ~3 s per Qwen3 layer here), but the
layers of a uniform decoder are the same computation with other weights. So the exporter traces
a two-layer copy of the model and :func:`replicate_layers` appends copies of layer 1 in onnx_ir:

- every node of the template layer is cloned, with fresh value names and its name scope
  metadata pointing at the new layer (``backbone.layers.5.self_attn.q_proj``), which the
  optimizer uses to name projections;
- the template's weights become new, data-less initializers named after the new layer
  (``backbone.layers.5.mlp.up_proj.weight``), so ``attach_weights`` binds each to its own
  checkpoint tensor exactly as for a full trace;
- the template's residual-stream input is wired to the previous copy's output, and whatever
  read the template's output (the final norm) reads the last copy's;
- everything else the template reads (rotary cos/sin, the attention mask, shape constants
  computed once in layer 0 or before) stays shared.

Layer 0 is not a template: the exporter computes the values all layers share inside it.

A model whose last layer differs (the text embedder computes only the pooled row's query and
MLP there) is traced with that layer after the template (``tail=1``): it is renamed to the
real last index and the copies go between the template and it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
NAMESPACE_KEY = "namespace"
TRACED_LAYERS = 2
"""Layer 0 holds the computations every layer shares, so layer 1 is the first plain layer."""


class ReplicationError(Exception):
    """The traced graph does not have the layer structure replication relies on."""


def layer_of(node: Any, scope: str) -> int | None:
    """The decoder layer a node was traced in (from its name scopes), or ``None``."""
    match = re.search(rf"'{re.escape(scope)}\.(\d+)'", node.metadata_props.get(SCOPES_KEY, ""))
    return int(match.group(1)) if match else None


def replicate_layers(model: Any, scope: str, total: int, tail: int = 0, *,
                     template: int = TRACED_LAYERS - 1) -> int:
    """Insert copies of layer ``template`` until the graph has ``total`` layers.

    Args:
        model: an ``onnx_ir.Model`` traced with ``template + 1 + tail`` layers, weights
            unbound.
        scope: the module path of the layer list in the graph, e.g. ``backbone.layers``.
        total: the depth of the real model.
        tail: 1 when the last traced layer is a different computation that must stay last.
        template: the layer to copy; it must read the residual stream straight from layer
            ``template - 1`` (the Qwen3-VL decoder adds deepstack features after its first
            layers, so its template is the first layer after those).

    Returns:
        How many layers were added.

    Raises:
        ReplicationError: the graph's layers are not laid out as expected (the caller falls
            back to a full-depth trace).
    """
    import onnx_ir as ir

    graph = model.graph
    nodes = list(graph)
    traced = template + 1 + tail
    if tail not in (0, 1) or template < 1 or total < traced:
        raise ReplicationError(f"cannot grow {traced} traced layers (tail {tail}) to {total}")
    body = [n for n in nodes if layer_of(n, scope) == template]
    if not body:
        raise ReplicationError(f"no node is scoped to {scope}.{template}")
    first, last = nodes.index(body[0]), nodes.index(body[-1])
    if last - first + 1 != len(body):
        raise ReplicationError(f"the nodes of {scope}.{template} are not contiguous")
    if any(layer_of(n, scope) not in (None, *range(traced)) for n in nodes):
        raise ReplicationError(f"the graph has more than {traced} layers")
    members = set(map(id, body))
    produced = {id(v) for n in body for v in n.outputs}

    outputs = [v for n in body for v in n.outputs
               if v.is_graph_output() or any(id(u) not in members for u, _ in v.uses())]
    if len(outputs) != 1 or outputs[0].is_graph_output():
        raise ReplicationError(f"{scope}.{template} should feed one value to the rest of the "
                               f"graph, found {[v.name for v in outputs]}")
    out = outputs[0]
    prefix = f"{scope}.{template}."
    weights: dict[int, Any] = {}
    residual: list[Any] = []
    for node in body:
        for value in node.inputs:
            if value is None or id(value) in produced:
                continue
            if value.is_initializer() and value.name.startswith(prefix):
                weights[id(value)] = value
            elif (value.producer() is not None and layer_of(value.producer(), scope) == template
                  - 1 and value.shape == out.shape and value.dtype == out.dtype
                  and all(v is not value for v in residual)):
                residual.append(value)
    if len(residual) != 1:
        raise ReplicationError(f"cannot tell the residual input of {scope}.{template}: "
                               f"{[v.name for v in residual]}")

    readers = [(u, i) for u, i in out.uses() if id(u) not in members]
    if tail:
        _move_layer(graph, nodes, scope, traced - 1, total - 1)
    anchor, previous = body[-1], out
    for k in range(template + 1, total - tail):
        mapping: dict[int, Any] = {id(residual[0]): previous}
        for value in weights.values():
            clone = ir.Value(name=f"{scope}.{k}.{value.name.removeprefix(prefix)}",
                             shape=_copy(value.shape), type=value.type,
                             const_value=value.const_value)
            graph.register_initializer(clone)
            mapping[id(value)] = clone
        copies = [_clone_node(node, mapping, scope, template, k) for node in body]
        graph.insert_after(anchor, copies)
        anchor, previous = copies[-1], mapping[id(out)]
    for user, index in readers:
        user.replace_input_with(index, previous)
    added = total - traced
    logger.info("replicated %s.%d into %d more layers", scope, template, added)
    return added


def _renamed(text: str, scope: str, old: int, new: int) -> str:
    return re.sub(rf"{re.escape(scope)}\.{old}(?!\d)", f"{scope}.{new}", text)


def _scoped_metadata(node: Any, scope: str, old: int, new: int) -> dict[str, str]:
    """``node``'s metadata with its name scopes moved from layer ``old`` to ``new``."""
    return {key: _renamed(text, scope, old, new) if key in (SCOPES_KEY, NAMESPACE_KEY) else text
            for key, text in node.metadata_props.items()}


def _move_layer(graph: Any, nodes: list[Any], scope: str, old: int, new: int) -> None:
    """Renumber traced layer ``old`` as ``new``: its weights' names and its nodes' scopes."""
    prefix = f"{scope}.{old}."
    for value in list(graph.initializers.values()):
        if value.name.startswith(prefix):
            value.name = f"{scope}.{new}.{value.name.removeprefix(prefix)}"
    # Every node, not only those traced inside layer ``old``'s forward: the embedder may call
    # its modules (``layers.2.self_attn.q_proj``) from outside it. Other nodes keep their text.
    for node in nodes:
        node.metadata_props.update(_scoped_metadata(node, scope, old, new))


def _clone_node(node: Any, mapping: dict[int, Any], scope: str, template: int, k: int) -> Any:
    """Copy ``node`` into layer ``k``; ``mapping`` (id of template value → copy) grows."""
    import onnx_ir as ir

    metadata = _scoped_metadata(node, scope, template, k)
    clone = ir.Node(
        node.domain, node.op_type, [None if v is None else mapping.get(id(v), v)
                                    for v in node.inputs],
        [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
        overload=node.overload, num_outputs=len(node.outputs), version=node.version,
        name=None if node.name is None else f"{node.name}_layer{k}",
        doc_string=node.doc_string, metadata_props=metadata)
    for old, new in zip(node.outputs, clone.outputs):
        new.name = None if old.name is None else f"{old.name}_layer{k}"
        new.shape = _copy(old.shape)
        new.type = old.type
        mapping[id(old)] = new
    return clone


def _copy(shape: Any) -> Any:
    return None if shape is None else shape.copy()
