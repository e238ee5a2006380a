"""Embed a whole corpus on Ray Data, exactly once: ``qwen3emb-export embed-corpus``.

    >>> from qwen3emb.corpus import embed_corpus
    >>> summary = embed_corpus("bundle/", ["docs/*.jsonl"], "out/")

Needs the ``corpus`` extra (``ray[data]``, pyarrow); no torch. See docs/corpus.md.
"""

from __future__ import annotations

from qwen3emb.corpus.job import CorpusOptions, CorpusSummary, RayOptions, embed_corpus

__all__ = ["CorpusOptions", "CorpusSummary", "RayOptions", "embed_corpus"]
