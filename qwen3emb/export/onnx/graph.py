"""Editing an ONNX graph in place: a producer/consumer index, node replacement with a
stable topological re-sort (Loop bodies' outer reads included), and the clean-up passes every
rewrite ends with (unused initializers, exporter metadata, duplicate node names)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

MS_DOMAIN = "com.microsoft"

class GraphIndex:
    """Producer/consumer index over an ``onnx.GraphProto`` (rebuilt after each pass)."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self._array = numpy_helper.to_array

    def const(self, name: str) -> Any:
        """The value of an initializer or Constant node output, else None."""
        if name in self.inits:
            tensor = self.inits[name]
            if tensor.data_location == tensor.EXTERNAL and not tensor.raw_data:
                return None  # a streamed weight: never one of the constants a fusion reads
            return self._array(tensor)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self._array(attr.t)
        return None

    def only_consumer(self, name: str, op_type: str) -> Any:
        """The single consumer of ``name`` if it has type ``op_type`` and ``name`` is internal."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or name in self.outputs:
            return None
        return users[0]


def other_input(node: Any, name: str) -> str:
    """The other input of a binary node."""
    a, b = node.input
    return b if a == name else a


def use_ms_domain(model: Any) -> None:
    """Import the ``com.microsoft`` operator domain into ``model`` unless it is there."""
    import onnx

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def replace_nodes(model: Any, drop: set[int], new_nodes: dict[int, Any],
                   microsoft: bool = False) -> None:
    """Drop nodes by index, put replacements in their place, and re-sort topologically;
    with ``microsoft``, import the ``com.microsoft`` domain the replacements use."""
    if microsoft and new_nodes:
        use_ms_domain(model)
    kept = []
    for i, node in enumerate(model.graph.node):
        if i in new_nodes:
            kept.append(new_nodes[i])
        elif i not in drop:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(topological(model.graph, kept))


def sort_nodes(model: Any) -> None:
    """Re-sort ``model``'s nodes topologically (stable), Loop bodies' reads included."""
    replace_nodes(model, set(), {})


def topological(graph: Any, nodes: list[Any]) -> list[Any]:
    """Order ``nodes`` so each comes after the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    produced = {name for node in nodes for name in node.output}
    # A Loop body reads tensors of this graph too: it must come after their producers.
    reads = {id(n): [*n.input, *(t for t in node_reads(n) if t in produced)] for n in nodes}
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in reads[id(node)]):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):  # a cycle or a dangling input: leave the rest as is
            ordered.extend(waiting)
            break
        pending = waiting
    return ordered


def prune_initializers(model: Any) -> int:
    """Remove initializers no node reads (the constants of fused-away nodes).

    Returns:
        How many were removed.
    """
    used = {name for node in model.graph.node for name in node_reads(node)}
    used |= {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    removed = len(model.graph.initializer) - len(kept)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return removed


def strip_metadata(model: Any) -> None:
    """Remove per-node exporter metadata (stack traces, fx nodes) and doc strings."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def unique_node_names(model: Any) -> int:
    """Give every node a name no other node has; onnxruntime refuses a graph with two nodes
    of one name ("two nodes with same node name").

    Fused nodes are named after their weight, and the exporter merges identical initializers
    (e.g. RMSNorm weights that are equal across layers in a freshly initialized checkpoint),
    so two fusions can pick the same name. Later duplicates get ``#1``, ``#2`` ... appended.

    Returns:
        How many nodes were renamed.
    """
    seen: set[str] = {n.name for n in model.graph.node}
    taken: set[str] = set()
    renamed = 0
    for node in model.graph.node:
        if not node.name:  # unnamed nodes never clash
            continue
        if node.name not in taken:
            taken.add(node.name)
            continue
        base = node.name
        k = 1
        while f"{base}#{k}" in seen or f"{base}#{k}" in taken:
            k += 1
        node.name = f"{base}#{k}"
        taken.add(node.name)
        renamed += 1
    return renamed

def node_reads(node: Any) -> set[str]:
    """The tensors of the enclosing graph a node reads: its inputs and what its subgraphs
    (Loop / If / Scan bodies) read from outside themselves."""
    reads: set[str] = set(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            inner |= {name for n in sub.node for name in n.output}
            for n in sub.node:
                reads |= node_reads(n) - inner
    return reads

def remove_dead_nodes(model: Any) -> int:
    """Remove nodes none of whose outputs is read (by a node, a subgraph or the graph).

    Returns:
        How many were removed.
    """
    graph = model.graph
    removed = 0
    while True:
        used = {o.name for o in graph.output}
        for node in graph.node:
            used.update(node_reads(node))
        kept = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(kept) == len(graph.node):
            return removed
        removed += len(graph.node) - len(kept)
        del graph.node[:]
        graph.node.extend(kept)
