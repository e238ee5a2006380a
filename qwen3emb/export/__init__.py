"""Artifact writers: the ONNX graph, the bundle around it, and their shared contract."""

from __future__ import annotations

from qwen3emb.export.bundle import ExportResult, export_bundle
from qwen3emb.export.spec import TextGraphSpec

__all__ = ["ExportResult", "TextGraphSpec", "export_bundle"]
