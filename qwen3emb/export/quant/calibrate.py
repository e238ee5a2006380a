"""Per-channel activation ranges of an fp32 graph, run piece by piece to bound memory.

SmoothQuant smoothing and the outlier test need ``max |x|`` per input channel of every weight
MatMul over a few calibration texts. An onnxruntime session of the whole fp32 graph would
hold every weight at once (30 GB for the 8B model). Instead the graph is cut, in its
topological order, into consecutive pieces whose weights fit a byte budget (about one
decoder layer each). Each piece becomes its own session; the tensors that cross a cut are
kept in memory per text (a few MB) and fed to the next piece. The arithmetic is the fp32
graph's own, so the ranges equal a whole-graph run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.export.onnx.graph import node_reads

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30
"""Weight bytes per piece: one 8B decoder layer is ~0.9 GB in fp32."""


@dataclass(frozen=True)
class Calibration:
    """Calibrated ranges and how they were obtained (for the manifest)."""

    ranges: dict[str, np.ndarray]
    texts: int
    pieces: int
    largest_piece_bytes: int
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    """The fp32 graph's outputs for each feed (the reference the fidelity search scores)."""

    def describe(self) -> str:
        return (f"per-channel max |x| of each weight-MatMul input over {self.texts} texts; "
                f"fp32 graph run by onnxruntime in {self.pieces} consecutive pieces of at "
                f"most {self.largest_piece_bytes / 1e6:.1f} MB of weights each")


def weight_matmul_inputs(model: Any) -> dict[str, list[Any]]:
    """Activation tensors that feed weight MatMuls → the MatMul nodes reading them."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            out.setdefault(node.input[0], []).append(node)
    return out


def _tensor_bytes(tensor: Any) -> int:
    import onnx

    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def split_graph(model: Any, chunk_bytes: int) -> list[list[Any]]:
    """Cut the (topologically sorted) nodes into runs whose initializers fit ``chunk_bytes``.

    A node whose own weights exceed the budget gets a piece of its own.
    """
    sizes = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    pieces: list[list[Any]] = [[]]
    held: set[str] = set()
    total = 0
    for node in model.graph.node:
        new = {name for name in node_reads(node) if name in sizes and name not in held}
        extra = sum(sizes[name] for name in new)
        if pieces[-1] and total + extra > chunk_bytes:
            pieces.append([])
            held, total = set(), 0
            new = {name for name in node_reads(node) if name in sizes}
            extra = sum(sizes[name] for name in new)
        pieces[-1].append(node)
        held |= new
        total += extra
    return [p for p in pieces if p]


def calibrate(source: Path, feeds: Sequence[dict[str, np.ndarray]], *,
              chunk_bytes: int = CHUNK_BYTES, progress: bool = False,
              observe: Callable[[str, np.ndarray, int], None] | None = None) -> Calibration:
    """Per-channel max |x| of every weight-MatMul input of the graph at ``source``.

    Args:
        source: an fp32 ``.onnx`` file (external data beside it stays on disk until a piece
            needs it).
        feeds: onnxruntime input dicts, one per calibration text.
        chunk_bytes: weight bytes per piece (memory bound; any value gives the same ranges).
        progress: show a bar over the pieces.
        observe: called with (tensor name, value, feed index) for every weight-MatMul input
            of every feed, while it is in memory (the fidelity search samples rows here).

    Returns:
        A :class:`Calibration` with ``{tensor name: [K] float32 channel maxima}`` and the
        graph's outputs per feed.
    """
    import onnx

    from qwen3emb.progress import bar

    model = onnx.load(os.fspath(source), load_external_data=False)
    taps = set(weight_matmul_inputs(model))
    pieces = split_graph(model, chunk_bytes)
    inits = {t.name: t for t in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    # Which piece reads each tensor last, so boundary tensors are dropped once consumed.
    last_use: dict[str, int] = {}
    for index, piece in enumerate(pieces):
        for node in piece:
            for name in node_reads(node):
                last_use[name] = index
    stores: list[dict[str, np.ndarray]] = [dict(feed) for feed in feeds]
    results: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    ranges: dict[str, np.ndarray] = {}
    largest = 0
    scratch = source.with_name(f".{source.stem}-calibrate.onnx")
    try:
        with bar(len(pieces), "calibrate", progress, unit="piece") as advancing:
            for index, piece in enumerate(pieces):
                produced = {name for node in piece for name in node.output if name}
                weights = sorted({name for node in piece for name in node_reads(node)
                                  if name in inits})
                largest = max(largest, sum(_tensor_bytes(inits[n]) for n in weights))
                inputs = sorted({name for node in piece for name in node_reads(node)
                                 if name and name not in produced and name not in inits})
                outputs = sorted(name for name in produced
                                 if name in graph_outputs or name in taps
                                 or last_use.get(name, -1) > index)
                if not outputs:  # nothing later needs this piece (cannot happen in practice)
                    advancing.update(1)
                    continue
                session = _piece_session(model, piece, index, inputs, outputs,
                                         [inits[n] for n in weights], stores[0], scratch)
                for feed, store in enumerate(stores):
                    values = session.run(outputs, {name: store[name] for name in inputs})
                    for name, value in zip(outputs, values):
                        store[name] = value
                        if name in graph_outputs:
                            results[feed][name] = value
                        if name in taps and observe is not None:
                            observe(name, value, feed)
                        if name in taps:
                            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                            peak = peak.astype(np.float32)
                            ranges[name] = (np.maximum(ranges[name], peak) if name in ranges
                                            else peak)
                    for name in [n for n in store if last_use.get(n, -1) <= index]:
                        del store[name]
                del session
                advancing.update(1)
    finally:
        scratch.unlink(missing_ok=True)
    logger.info("calibrated %d tensors in %d pieces", len(ranges), len(pieces))
    return Calibration(ranges, len(feeds), len(pieces), largest, results)


def _piece_session(model: Any, nodes: list[Any], index: int, inputs: list[str],
                   outputs: list[str], weights: list[Any], example: dict[str, np.ndarray],
                   scratch: Path) -> Any:
    """An onnxruntime session for one piece, its weights read from the source's data file."""
    import onnx
    import onnxruntime as ort

    helper = onnx.helper
    graph = helper.make_graph(
        nodes, f"piece{index}",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(example[n].dtype),
                                       None) for n in inputs],
        [helper.make_empty_tensor_value_info(n) for n in outputs], initializer=weights)
    piece = helper.make_model(graph, opset_imports=list(model.opset_import),
                              ir_version=model.ir_version)
    # Written beside the source, so external-data locations resolve to its data file.
    scratch.write_bytes(piece.SerializeToString())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Fusions could swallow the tapped tensors; basic constant folding keeps them.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(os.fspath(scratch), options,
                                providers=["CPUExecutionProvider"])
