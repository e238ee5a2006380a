"""qwen3emb: export Qwen3-Embedding checkpoints to deployable artifacts.

Import :mod:`qwen3emb.runtime` to run bundles (needs only numpy, onnxruntime and tokenizers);
:mod:`qwen3emb.convert`, :mod:`qwen3emb.export` and :mod:`qwen3emb.validate` need the
``export`` extra (torch, transformers, onnx).
"""

from __future__ import annotations

__version__ = "0.1.0"
