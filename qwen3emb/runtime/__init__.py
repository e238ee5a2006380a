"""Inference on exported bundles with onnxruntime. Needs numpy, onnxruntime and tokenizers only.

    >>> from qwen3emb.runtime import TextEmbedder
    >>> embedder = TextEmbedder("bundle/")
    >>> vectors = embedder.encode_queries(["what is an embedding?"])
"""

from __future__ import annotations

from qwen3emb.runtime.common import format_query
from qwen3emb.runtime.gguf import GGUFTextEmbedder
from qwen3emb.runtime.gguf_rerank import GGUFReranker, open_reranker
from qwen3emb.runtime.rerank import Reranker
from qwen3emb.runtime.session import available_providers
from qwen3emb.runtime.text import TextEmbedder
from qwen3emb.runtime.vl import ItemErrors, VLEmbedder
from qwen3emb.runtime.vl_rerank import VLReranker

__all__ = [
    "GGUFReranker",
    "GGUFTextEmbedder",
    "ItemErrors",
    "Reranker",
    "TextEmbedder",
    "VLEmbedder",
    "VLReranker",
    "available_providers",
    "format_query",
    "open_reranker",
]
