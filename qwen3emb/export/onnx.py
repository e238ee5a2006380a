"""Trace a family's embedding module with torch.onnx (dynamo) and write the ONNX file."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from qwen3emb.convert.base import Family
from qwen3emb.errors import OutputError
from qwen3emb.export.spec import TextGraphSpec

logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Weights above 1 GiB go to ``<model>.onnx.data`` (protobuf caps a file at 2 GiB)."""


def _example_inputs(vocab_size: int) -> tuple[Any, Any]:
    import torch

    # Batch 2 with one left-padded row: the exporter sees a real mask, and neither
    # dimension is 0 or 1 (which torch.export would specialize).
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab_size - 1, 2), (2, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def export_onnx(
    family: Family,
    out_path: Path,
    spec: TextGraphSpec,
    *,
    dimensions: int | None = None,
    backbone: Any = None,
) -> Path:
    """Export the family's embedding graph to ``out_path`` (fp32, dynamic batch and sequence).

    Args:
        family: the checkpoint's family (supplies the backbone and the wrapper).
        out_path: the ``.onnx`` file to write; large weights go beside it as ``.onnx.data``.
        spec: the graph contract (names, opset, output width).
        dimensions: Matryoshka width baked into the graph (``None`` = full width).
        backbone: an already-loaded fp32 backbone, to avoid loading it twice.

    Returns:
        ``out_path``.

    Raises:
        OutputError: the exporter failed or produced a graph that breaks the contract.
    """
    import onnx
    import torch

    module = family.embedding_module(backbone or family.load_backbone(torch.float32), dimensions)
    ids, mask = _example_inputs(int(family.config["vocab_size"]))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch, 1: sequence}
    logger.info("tracing %s with torch.onnx (dynamo, opset %d)", family.model_type, spec.opset)
    captured = io.StringIO()
    try:
        # The exporter prints progress to stdout; keep library output quiet.
        with torch.no_grad(), contextlib.redirect_stdout(captured):
            program = torch.onnx.export(
                module,
                (ids, mask),
                dynamo=True,
                input_names=spec.input_names,
                output_names=spec.output_names,
                opset_version=spec.opset,
                dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                optimize=True,
                verbose=False,
            )
    except Exception as e:
        logger.debug("exporter output:\n%s", captured.getvalue())
        raise OutputError(
            f"torch.onnx.export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}",
            hint="Run with QWEN3EMB_DEBUG=1 for the traceback; check torch/transformers versions",
        ) from e
    model = program.model_proto
    weight_bytes = sum(
        int(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize) * _numel(t)
        for t in model.graph.initializer
    )
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_name = out_path.name + ".data"
    if external:
        onnx.save_model(model, os.fspath(out_path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, os.fspath(out_path))
    check_graph_contract(out_path, spec)
    logger.info("wrote %s (%.1f MB of weights%s)", out_path, weight_bytes / 1e6,
                ", external data" if external else "")
    return out_path


def _numel(tensor: Any) -> int:
    count = 1
    for d in tensor.dims:
        count *= int(d)
    return count


def check_graph_contract(path: Path, spec: TextGraphSpec, *, schema_check: bool = True) -> None:
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

    if schema_check:
        onnx.checker.check_model(os.fspath(path))  # path form: works with external data
    model = onnx.load(os.fspath(path), load_external_data=False)
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
