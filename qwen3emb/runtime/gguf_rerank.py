"""Score query/document pairs with a reranker bundle's GGUF through llama.cpp's rank pooling:
the twin of the ONNX :class:`qwen3emb.runtime.Reranker`.

The pairs are tokenized by the bundle's own tokenizer with the model card's prompt and
truncation (:class:`qwen3emb.runtime.rerank.RerankPrompt`), exactly as for the ONNX graphs, and
llama.cpp runs the ids: rank pooling takes the last token's final-norm state through the GGUF's
``cls.output`` head (``lm_head[yes] − lm_head[no]`` and zero) and a softmax, whose first
output is the score. Needs numpy, tokenizers and the ``gguf`` extra; never torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3emb.errors import BundleError, InputError
from qwen3emb.manifest import read_manifest
from qwen3emb.runtime.common import length_batches
from qwen3emb.runtime.gguf import TOKEN_BUDGET, LlamaPooled, _split_by_tokens, resolve_gguf
from qwen3emb.runtime.rerank import PairScorer, Reranker, RerankPrompt

logger = logging.getLogger(__name__)

RANK_POOLING = 4
"""``llama_pooling_type`` RANK, as the GGUF's ``qwen3.pooling_type`` stores it."""


class GGUFReranker(LlamaPooled, PairScorer):
    """Qwen3-Reranker on llama.cpp: ``score``/``rerank`` as :class:`Reranker`'s.

    One llama.cpp context per instance, so an instance is not thread-safe.

    Args:
        bundle: a reranker bundle directory with GGUF models (``export --format gguf``).
        gguf_type: which GGUF to load; default the highest precision present.
        n_threads: llama.cpp threads; default all cores.
        max_length: longest pair in tokens (prompt included); at most the bundle's.

    Raises:
        MissingDependencyError: llama-cpp-python is not installed (``gguf`` extra).
        BundleError: not a reranker bundle, or its GGUF is not a rank-pooling reranker.
        InputError: an unknown ``gguf_type`` or a bad ``max_length``.
    """

    pooling = "LLAMA_POOLING_TYPE_RANK"

    def __init__(self, bundle: str | os.PathLike[str], *, gguf_type: str | None = None,
                 n_threads: int | None = None, max_length: int | None = None) -> None:
        manifest = read_manifest(bundle)
        if manifest.task != "rerank":
            raise BundleError(f"'{bundle}' holds an {manifest.task} bundle, not a reranker",
                              hint="Load it with GGUFTextEmbedder")
        path, _ = resolve_gguf(bundle, gguf_type)
        limit = manifest.max_length
        if max_length is not None and not 1 <= max_length <= limit:
            raise InputError(f"max_length={max_length} is outside 1..{limit} for this bundle",
                             hint=f"Choose a value up to the bundle's max_length {limit}")
        super().__init__(path, n_threads)
        self.manifest = manifest
        self.gguf_type = next(t for t, e in manifest.models("gguf").items()
                              if manifest.root / e["path"] == path)
        self._check_head()
        self.max_length = max_length or limit
        self.prompt = RerankPrompt.from_manifest(manifest, self.max_length)

    @property
    def providers(self) -> list[str]:
        """What runs the model, for reports."""
        return ["llama.cpp"]

    def _check_head(self) -> None:
        """The GGUF must pool by rank with the two-output yes/no head, else its "scores" are
        a slice of a hidden state."""
        lib = self._lib
        pooling = self._meta(b"qwen3.pooling_type")
        outputs = int(lib.llama_model_n_cls_out(self._model))
        label = lib.llama_model_cls_label(self._model, 0) if outputs else None
        if pooling != str(RANK_POOLING) or outputs != 2 or label != b"yes":
            self.close()
            raise BundleError(
                f"'{self.path}' is not a llama.cpp reranker (pooling_type {pooling}, "
                f"{outputs} classifier outputs, first label {label!r}; want {RANK_POOLING}, 2, "
                "'yes')", hint="Re-export it with: qwen3emb-export export --task rerank "
                               "--format gguf")

    def run_ids(self, ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """One llama_decode over tokenized pairs → (score, logit) float32, where the logit is
        log(p_yes / p_no) of llama.cpp's softmax (the raw difference, up to rounding)."""
        probs = self._pooled([list(row) for row in ids], 2).astype(np.float64)
        with np.errstate(divide="ignore"):
            logit = np.log(probs[:, 0]) - np.log(probs[:, 1])
        return probs[:, 0].astype(np.float32), logit.astype(np.float32)

    def score_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 16,
                  logits: bool = False) -> np.ndarray:
        """Scores (or, with ``logits``, log(p_yes / p_no)) of tokenized pairs."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}",
                             hint="Use e.g. batch_size=16")
        lengths = [len(r) for r in ids]
        out = np.empty(len(ids), dtype=np.float32)
        for batch in length_batches(lengths, batch_size):
            for chunk in _split_by_tokens(batch, lengths, TOKEN_BUDGET):
                out[chunk] = self.run_ids([ids[i] for i in chunk])[1 if logits else 0]
        return out


def open_reranker(bundle: str | os.PathLike[str], precision: str | None = None,
                  providers: Sequence[str] | str | None = None, *, threads: int | None = None,
                  max_length: int | None = None, **onnx: Any) -> Any:
    """The reranker of one precision of a bundle: ONNX on onnxruntime (:class:`Reranker`, or
    :class:`qwen3emb.runtime.VLReranker` for Qwen3-VL bundles), or a GGUF type on llama.cpp
    (``precision=None``: fp32, or the best GGUF of a GGUF-only bundle).

    Raises:
        InputError: ``providers`` with a GGUF precision.
        BundleError, ProviderError: from the runtime.
    """
    manifest = read_manifest(bundle)
    if manifest.task == "rerank" and "vision" in manifest.data:
        from qwen3emb.runtime.vl_rerank import VLReranker

        return VLReranker(bundle, providers, precision=precision or "fp32", threads=threads,
                          max_length=max_length, **onnx)
    if manifest.runs_on_llama_cpp(precision, providers):
        return GGUFReranker(bundle, gguf_type=precision, n_threads=threads,
                            max_length=max_length)
    return Reranker(bundle, providers, precision=precision or "fp32", threads=threads,
                    max_length=max_length, **onnx)
