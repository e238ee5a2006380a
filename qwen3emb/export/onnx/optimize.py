"""Rewrite the exported fp32 graph into onnxruntime's fused CPU kernels, without changing it.

The dynamo exporter writes RMSNorm as seven elementwise nodes (Pow, ReduceMean, Add, Sqrt,
Reciprocal, Mul, Mul), and onnxruntime's own optimizer does not recognise that form (it
expects a Div), nor does its transformers optimizer know Qwen3. This module:

- names every projection after its module (``backbone.layers.3.mlp.down_proj``), so the
  quantizers can include or exclude MatMuls by role;
- fuses each RMSNorm into ``SimplifiedLayerNormalization`` (fp32 statistics, one kernel);
- fuses each residual ``Add`` feeding an RMSNorm into ``com.microsoft``
  ``SkipSimplifiedLayerNormalization``, which also returns the residual sum, so the whole
  residual stream lives in nodes that the fp16 converter keeps in fp32;
- fuses the elementwise GELUs (the Qwen3-VL vision tower's) into ``com.microsoft``
  ``FastGelu`` / ``Gelu``;
- rewrites each full-sequence attention as a loop over query blocks, so no (heads × seq ×
  seq) tensor is ever held (:mod:`qwen3emb.export.onnx.attention`);
- drops the exporter's per-node metadata (stack traces: ~160 kB per layer of file size).

The fusions live in :mod:`qwen3emb.export.onnx.fusions`, the attention rewrite in
:mod:`qwen3emb.export.onnx.attention`, the graph-editing primitives they share in
:mod:`qwen3emb.export.onnx.graph`; this module runs them in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from qwen3emb.export.onnx.attention import block_attention
from qwen3emb.export.onnx.fusions import (
    fuse_gelus,
    fuse_rms_norms,
    fuse_skip_norms,
    name_projections,
)
from qwen3emb.export.onnx.graph import prune_initializers, strip_metadata, unique_node_names

logger = logging.getLogger(__name__)


@dataclass
class OptimizeStats:
    """What :func:`optimize_graph` changed."""

    named_projections: int = 0
    rms_norms: int = 0
    skip_norms: int = 0
    renamed_nodes: int = 0
    gelus: int = 0
    blocked_attention: int = 0

    def to_dict(self) -> dict[str, int]:
        out = {"named_projections": self.named_projections, "rms_norms": self.rms_norms,
               "skip_norms": self.skip_norms}
        if self.renamed_nodes:
            out["renamed_nodes"] = self.renamed_nodes
        if self.gelus:
            out["gelus"] = self.gelus
        if self.blocked_attention:
            out["blocked_attention"] = self.blocked_attention
        return out


def optimize_graph(model: Any) -> OptimizeStats:
    """Apply every rewrite of this module to ``model`` (an ``onnx.ModelProto``) in place.

    Args:
        model: the fp32 graph written by :func:`qwen3emb.export.onnx.trace.export_onnx`.

    Returns:
        Counts of what was rewritten.
    """
    stats = OptimizeStats()
    stats.named_projections = name_projections(model)
    stats.rms_norms = fuse_rms_norms(model)
    stats.skip_norms = fuse_skip_norms(model)
    stats.gelus = fuse_gelus(model)
    # A decoder reads attention_mask (causal, padded); a vision tower has none (bidirectional).
    causal = any(i.name == "attention_mask" for i in model.graph.input)
    stats.blocked_attention = block_attention(model, causal=causal)
    prune_initializers(model)
    strip_metadata(model)
    stats.renamed_nodes = unique_node_names(model)
    logger.info("optimized graph: %s", stats.to_dict())
    return stats
