"""Extra graph outputs that loaders other than ours read (docs/interop.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qwen3emb.constants import INPUT_IDS, LAST_HIDDEN_STATE, SENTENCE_EMBEDDING
from qwen3emb.errors import OutputError


def add_hidden_state_output(model: Any) -> None:
    """Append ``last_hidden_state`` = ``sentence_embedding`` broadcast to [batch, sequence, dim].

    optimum (sentence-transformers' ONNX backend) and transformers.js read only an output of
    that name and pool it themselves; mean, last-token or first-token pooling of a row that is
    the same at every position, followed by L2, returns the embedding unchanged. Four cheap
    nodes (Shape, Concat, Unsqueeze, Expand) after the pooled output; our runtime fetches only
    ``sentence_embedding``.

    Args:
        model: an ``onnx_ir.Model`` whose graph has ``input_ids`` in and
            ``sentence_embedding`` [batch, dim] out (changed in place).

    Raises:
        OutputError: the graph lacks those values.
    """
    import onnx_ir as ir

    graph = model.graph
    ids = next((v for v in graph.inputs if v.name == INPUT_IDS), None)
    embedding = next((v for v in graph.outputs if v.name == SENTENCE_EMBEDDING), None)
    if ids is None or embedding is None or embedding.shape is None:
        raise OutputError(f"cannot add {LAST_HIDDEN_STATE}: the graph has no {INPUT_IDS} "
                          f"input or no {SENTENCE_EMBEDDING} output",
                          hint="This is a bug in qwen3emb-export; please report it")
    batch, width = embedding.shape.dims[0], embedding.shape.dims[-1]

    def add(op: str, inputs: list[Any], **attributes: Any) -> Any:
        node = ir.node(op, inputs, attributes or None,
                       name=f"/interop/{op}_{sum(1 for n in graph if n.op_type == op)}")
        graph.append(node)
        return node.outputs[0]

    one = add("Constant", [], value=ir.tensor(np.array([1], dtype=np.int64)))
    target = add("Concat", [add("Shape", [ids]), one], axis=0)  # [batch, sequence, 1]
    axes = add("Constant", [], value=ir.tensor(np.array([1], dtype=np.int64)))
    hidden = add("Expand", [add("Unsqueeze", [embedding, axes]), target])
    hidden.name = LAST_HIDDEN_STATE
    hidden.type = ir.TensorType(ir.DataType.FLOAT)
    sequence = ids.shape.dims[1] if ids.shape is not None else "sequence"
    hidden.shape = ir.Shape([batch, sequence, width])
    graph.outputs.append(hidden)
