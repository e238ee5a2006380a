"""Trace a loaded torch module with the dynamo exporter (the path of families whose graphs
are not streamed yet, see :attr:`Family.streamable`)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from pathlib import Path
from typing import Any

from qwen3emb.constants import EXTERNAL_DATA_SUFFIX
from qwen3emb.errors import OutputError
from qwen3emb.export.onnx.contract import check_graph_contract
from qwen3emb.export.onnx.trace import EXTERNAL_DATA_THRESHOLD

logger = logging.getLogger(__name__)


def export_module(module: Any, example: tuple[Any, ...], dynamic: dict[str, Any], spec: Any,
                  out_path: Path) -> Path:
    """Export ``module`` to ``out_path`` and rename its I/O axes to the spec's names.

    Raises:
        OutputError: the exporter failed, or the graph breaks ``spec``.
    """
    import onnx
    import torch

    captured = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(captured):
            program = torch.onnx.export(
                module, example, dynamo=True, input_names=spec.input_names,
                output_names=spec.output_names, opset_version=spec.opset,
                dynamic_shapes=dynamic, optimize=True, verbose=False,
            )
    except Exception as e:
        logger.debug("exporter output:\n%s", captured.getvalue())
        raise OutputError(
            f"torch.onnx.export of the {spec.name} graph failed: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200]}",
            hint="Run with QWEN3EMB_DEBUG=1 for the traceback; check torch/transformers versions",
        ) from e
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise OutputError(f"torch.onnx.export returned nothing for the {spec.name} graph")
    model = program.model_proto
    # The exporter names derived axes after its symbols ("4*blocks", "groups*s79").
    for values, specs in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        for value, tensor in zip(values, specs):
            for dim, axis in zip(value.type.tensor_type.shape.dim, tensor.axes):
                if not axis.isdigit():
                    dim.dim_param = axis
    weight_bytes = sum(
        int(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize) * math.prod(t.dims)
        for t in model.graph.initializer
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, os.fspath(out_path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=out_path.name + EXTERNAL_DATA_SUFFIX,
                        size_threshold=1024)
    else:
        onnx.save_model(model, os.fspath(out_path))
    check_graph_contract(out_path, spec)
    logger.info("wrote %s (%.1f MB of weights)", out_path, weight_bytes / 1e6)
    return out_path
