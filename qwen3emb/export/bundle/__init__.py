"""The bundle writer: every family's graphs, GGUF files, tokenizer and manifest, staged and
load-checked before they are moved into place."""

from __future__ import annotations

from qwen3emb.export.bundle.staging import check_loadable, staged_directory
from qwen3emb.export.bundle.writer import ExportResult, write_bundle

__all__ = ["ExportResult", "check_loadable", "staged_directory", "write_bundle"]
