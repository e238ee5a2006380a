"""Reranker: score query/document pairs with a reranker bundle's ONNX graph. No torch needed.

The prompt is the model card's: the system prefix, ``<Instruct>: …\\n<Query>: …\\n<Document>: …``
tokenized by the checkpoint's own tokenizer (its post-processor's tokens kept) and truncated
to ``max_length`` minus the prefix and suffix, then the suffix. Prefix and suffix are never
cut. The graph reads the last real token of each row, so rows are padded on the right and a
document's score does not depend on its batch mates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen3emb.constants import ATTENTION_MASK, INPUT_IDS, LOGITS, SCORE
from qwen3emb.errors import BundleError, InputError
from qwen3emb.manifest import Manifest, read_manifest
from qwen3emb.runtime.common import checked_model, length_batches
from qwen3emb.runtime.session import open_session

logger = logging.getLogger(__name__)

MIN_CONTENT_TOKENS = 8
"""A ``max_length`` must leave at least this many tokens for the content after the prompt."""


@dataclass
class RerankPrompt:
    """The model card's pair format over a ``tokenizers.Tokenizer``.

    Args:
        tokenizer: the bundle's (or checkpoint's) tokenizer.
        prefix, suffix, template, default_instruction: from the manifest's ``rerank`` section.
        max_length: longest pair in tokens, prefix and suffix included.
        truncation_side: the checkpoint's ``truncation_side`` (``right`` by default).
    """

    tokenizer: Any
    prefix: str
    suffix: str
    template: str
    default_instruction: str
    max_length: int
    truncation_side: str = "right"

    def __post_init__(self) -> None:
        self.prefix_ids = self.tokenizer.encode(self.prefix, add_special_tokens=False).ids
        self.suffix_ids = self.tokenizer.encode(self.suffix, add_special_tokens=False).ids
        budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if budget < MIN_CONTENT_TOKENS:
            raise InputError(
                f"max_length={self.max_length} leaves {budget} tokens for the query and document "
                f"after the {len(self.prefix_ids) + len(self.suffix_ids)}-token prompt",
                hint=f"Use max_length >= "
                     f"{len(self.prefix_ids) + len(self.suffix_ids) + MIN_CONTENT_TOKENS}")
        self.content_budget = budget
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=budget, strategy="longest_first",
                                         direction=self.truncation_side)

    @classmethod
    def from_manifest(cls, manifest: Manifest, max_length: int) -> RerankPrompt:
        """The prompt of a reranker bundle, over its ``tokenizer.json``.

        Raises:
            BundleError: the tokenizer is missing or disagrees with the manifest.
        """
        from tokenizers import Tokenizer

        path = manifest.root / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise BundleError(f"cannot load '{path}': {e}", hint="Re-run the export") from e
        rerank, info = manifest.rerank, manifest.tokenizer
        for token, key in ((info.get("yes_token", "yes"), "yes_token_id"),
                           (info.get("no_token", "no"), "no_token_id")):
            if tokenizer.token_to_id(token) != rerank[key]:
                raise BundleError(f"tokenizer.json maps {token!r} to "
                                  f"{tokenizer.token_to_id(token)}, the manifest says "
                                  f"{rerank[key]}", hint="The bundle's files do not belong "
                                                         "together; re-run the export")
        return cls(tokenizer, rerank["prefix"], rerank["suffix"], rerank["template"],
                   rerank["default_instruction"], max_length,
                   str(info.get("truncation_side", "right")))

    def content(self, query: str, document: str, instruction: str | None = None) -> str:
        """The user turn's text: ``<Instruct>: …\\n<Query>: …\\n<Document>: …``."""
        return self.template.format(instruction=self.default_instruction
                                    if instruction is None else instruction,
                                    query=query, document=document)

    def pair_ids(self, query: str, documents: Sequence[str], instruction: str | None = None
                 ) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each (query, document) pair, and whether its content was cut."""
        encodings = self.tokenizer.encode_batch(
            [self.content(query, d, instruction) for d in documents])
        return ([self.prefix_ids + e.ids + self.suffix_ids for e in encodings],
                [bool(e.overflowing) for e in encodings])


def check_pairs(query: Any, documents: Any, instruction: Any) -> list[str]:
    """Validate a query, its documents and an instruction (empty strings are content too).

    Raises:
        InputError: a non-string query or instruction, a bare string for documents, or a
            non-string document, naming its index.
    """
    if not isinstance(query, str):
        raise InputError(f"query is a {type(query).__name__}, not a string",
                         hint="Pass the query as a string")
    if instruction is not None and not isinstance(instruction, str):
        raise InputError(f"instruction is a {type(instruction).__name__}, not a string",
                         hint="Pass a string, or None for the model card's default")
    if isinstance(documents, str):
        raise InputError("expected a list of documents, got a single string",
                         hint="Wrap it in a list: score(query, [document])")
    items = list(documents)
    for i, doc in enumerate(items):
        if not isinstance(doc, str):
            raise InputError(f"document {i} is a {type(doc).__name__}, not a string",
                             hint="Pass strings only")
    return items


class PairScorer:
    """``score`` and ``rerank`` over a :class:`RerankPrompt` and ``score_ids``: what the ONNX and
    the llama.cpp rerankers share."""

    prompt: RerankPrompt

    def score_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 16,
                  logits: bool = False) -> np.ndarray:
        raise NotImplementedError

    def score(self, query: str, documents: Sequence[str], instruction: str | None = None, *,
              batch_size: int = 16) -> np.ndarray:
        """How well each document meets the query, in (0, 1), one float32 per document in order.

        Args:
            query: the query (a string; may be empty).
            documents: the candidates (strings; may be empty).
            instruction: the task (default: the model card's web-search instruction).
            batch_size: pairs per engine call (a pair's score never depends on it).

        Raises:
            InputError: non-string inputs, a bare string for ``documents``, bad batch_size.
        """
        items = check_pairs(query, documents, instruction)
        if not items:
            return np.empty(0, dtype=np.float32)
        ids, _ = self.prompt.pair_ids(query, items, instruction)
        return self.score_ids(ids, batch_size=batch_size)

    def rerank(self, query: str, documents: Sequence[str], *, top_n: int | None = None,
               instruction: str | None = None, batch_size: int = 16) -> list[tuple[int, float]]:
        """``(index, score)`` of the documents, best first (ties keep input order).

        Raises:
            InputError: as :meth:`score`, or ``top_n`` below 1.
        """
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int)
                                  or top_n < 1):
            raise InputError(f"top_n must be a positive integer, got {top_n!r}",
                             hint="Omit it to rank every document")
        scores = self.score(query, documents, instruction, batch_size=batch_size)
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
        return [(i, float(scores[i])) for i in order[:top_n]]


class Reranker(PairScorer):
    """Score documents against a query with a reranker bundle (``export --task rerank``).

    Args:
        bundle: the bundle directory.
        providers: onnxruntime providers (``"cpu"``, ``"cuda"``, ``"coreml"`` or full names).
        precision: which ONNX model of the bundle to run.
        threads: onnxruntime intra-op threads.
        max_length: longest pair in tokens (prompt included); defaults to the bundle's and
            may not exceed it.
        verify: check every file's sha256 against the manifest on load.
        strict: refuse bundles whose recorded parity check failed.
        spinning: let onnxruntime's threads spin-wait between runs (off for servers).

    Raises:
        BundleError: not a reranker bundle, missing/corrupt files, failed parity with ``strict``.
        ProviderError: a requested provider is not available.
        InputError: unknown precision or bad ``max_length``.
    """

    def __init__(self, bundle: str | os.PathLike[str],
                 providers: Sequence[str] | str | None = None, *, precision: str = "fp32",
                 threads: int | None = None, max_length: int | None = None,
                 verify: bool = True, strict: bool = True, spinning: bool = True) -> None:
        manifest = read_manifest(bundle)
        if manifest.task != "rerank":
            raise BundleError(f"'{bundle}' holds an {manifest.task} bundle, not a reranker",
                              hint="Load it with TextEmbedder or VLEmbedder")
        if manifest.family != "qwen3":
            raise BundleError(f"'{bundle}' holds a '{manifest.family}' reranker; Reranker "
                              "reads text rerankers", hint="Use the reranker for that family")
        model = checked_model(manifest, bundle, precision, verify=verify, strict=strict)
        limit = manifest.max_length
        if max_length is not None and not 1 <= max_length <= limit:
            raise InputError(f"max_length={max_length} is outside 1..{limit} for this bundle",
                             hint=f"Choose a value up to the bundle's max_length {limit}")
        self.manifest = manifest
        self.precision = precision
        self.max_length = max_length or limit
        self.prompt = RerankPrompt.from_manifest(manifest, self.max_length)
        self.pad_id = int(manifest.tokenizer["pad_token_id"])
        self.session = open_session(manifest.root / model["path"], providers,
                                    threads, spinning=spinning,
                                    precision=precision if strict else None)

    @property
    def providers(self) -> list[str]:
        """Providers the session actually runs on."""
        return list(self.session.get_providers())

    def run_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on padded int64 arrays → (score [batch], logits [batch]) float32."""
        feeds = {INPUT_IDS: input_ids.astype(np.int64, copy=False),
                 ATTENTION_MASK: attention_mask.astype(np.int64, copy=False)}
        score, logits = self.session.run([SCORE, LOGITS], feeds)
        return (np.asarray(score, dtype=np.float32).reshape(-1),
                np.asarray(logits, dtype=np.float32).reshape(-1))

    def score_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int = 16,
                  logits: bool = False) -> np.ndarray:
        """Scores (or, with ``logits``, the pre-sigmoid differences) of tokenized pairs."""
        out = np.empty(len(ids), dtype=np.float32)
        for batch in length_batches([len(r) for r in ids], batch_size):
            rows = [ids[i] for i in batch]
            width = max(len(r) for r in rows)
            input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for j, row in enumerate(rows):
                input_ids[j, :len(row)] = row
                mask[j, :len(row)] = 1
            score, logit = self.run_ids(input_ids, mask)
            out[batch] = logit if logits else score
        return out
