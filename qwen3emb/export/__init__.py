"""Artifact writers. Rooms: ``onnx/`` (trace, replicate, stream weights, fuse), ``quant/``
(fp16/int8/int4 variants and calibration), ``gguf/`` (llama.cpp files), ``bundle/`` (the
one writer that stages, load-checks and moves a bundle into place)."""

from __future__ import annotations

from qwen3emb.export.bundle import ExportResult, write_bundle

__all__ = ["ExportResult", "write_bundle"]
