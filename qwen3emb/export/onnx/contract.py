"""The graph contract check every writer runs on what it wrote."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen3emb.errors import OutputError


def check_graph_contract(path: Path, spec: Any, *,
                         schema_check: bool = True) -> None:
    """Check names, dtypes and dynamic axes of a written graph against ``spec``.

    Args:
        path: the ``.onnx`` file.
        spec: the contract.
        schema_check: also run ``onnx.checker`` (off for graphs with onnxruntime contrib ops,
            which onnx does not know; onnxruntime checks those when it loads them).

    Raises:
        OutputError: listing every mismatch.
    """
    import onnx

    # Check the graph, not the weights: reading 32 GB of external data back would double an
    # 8B export's time and prove nothing the writer did not already guarantee.
    model = onnx.load(os.fspath(path), load_external_data=False)
    if schema_check:
        cwd = os.getcwd()
        os.chdir(path.parent)  # the checker resolves external data locations from the CWD
        try:
            onnx.checker.check_model(model)
        finally:
            os.chdir(cwd)
    problems: list[str] = []

    def describe(value: Any) -> tuple[str, str, list[str | int]]:
        t = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return value.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims

    got_inputs = [describe(v) for v in model.graph.input]
    got_outputs = [describe(v) for v in model.graph.output]
    for want, got in ((spec.inputs, got_inputs), (spec.outputs, got_outputs)):
        if [w.name for w in want] != [g[0] for g in got]:
            problems.append(f"names {[g[0] for g in got]} != {[w.name for w in want]}")
            continue
        for w, (name, dtype, dims) in zip(want, got):
            if dtype != w.dtype:
                problems.append(f"{name}: dtype {dtype} != {w.dtype}")
            if [str(d) for d in dims] != list(w.axes):
                problems.append(f"{name}: shape {dims} != {list(w.axes)}")
    if problems:
        raise OutputError(f"exported graph breaks its contract: {'; '.join(problems)}",
                          hint="This is a bug in qwen3emb-export; please report it")
