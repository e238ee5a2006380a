"""TextEmbedder: run a text bundle's ONNX graph with onnxruntime. No torch needed."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3emb.constants import ATTENTION_MASK, INPUT_IDS, SENTENCE_EMBEDDING
from qwen3emb.errors import BundleError, InputError
from qwen3emb.manifest import Manifest, read_manifest
from qwen3emb.runtime.common import (
    check_dimensions,
    check_texts,
    checked_model,
    format_query,
    length_batches,
    truncate_normalize,
)
from qwen3emb.runtime.session import open_session

logger = logging.getLogger(__name__)


def load_tokenizer(manifest: Manifest, max_length: int) -> tuple[Any, int]:
    """Load the bundle's ``tokenizer.json``, truncating to ``max_length`` with the end token last.

    Returns:
        The tokenizer and the id of the end token (also used for padding).

    Raises:
        BundleError: the tokenizer is missing or does not append the end token.
    """
    from tokenizers import Tokenizer

    info = manifest.tokenizer
    path = manifest.root / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise BundleError(f"cannot load '{path}': {e}", hint="Re-run the export") from e
    end_id = int(info["end_token_id"])
    if tokenizer.token_to_id(info["end_token"]) != end_id:
        raise BundleError(
            f"tokenizer.json maps {info['end_token']} to "
            f"{tokenizer.token_to_id(info['end_token'])}, the manifest says {end_id}",
            hint="The bundle's files do not belong together; re-run the export",
        )
    # Truncation counts the special tokens the post-processor adds, so the end token survives.
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    probe = tokenizer.encode("probe").ids
    if not probe or probe[-1] != end_id:
        raise BundleError(
            f"tokenizer.json does not append {info['end_token']} (got ids {probe[-3:]})",
            hint="The pooled token would be wrong; re-export with the checkpoint's tokenizer",
        )
    return tokenizer, end_id


class TextEmbedder:
    """Embed texts with a text bundle (``qwen3emb-export export`` output).

    Args:
        bundle: the bundle directory.
        providers: onnxruntime providers, short (``"cpu"``, ``"cuda"``, ``"coreml"``) or full
            names; CPU when ``None``.
        precision: which ONNX model of the bundle to run (``"fp32"``, or another precision
            the bundle lists).
        verify: check every file's sha256 against the manifest on load.
        max_length: truncate inputs to this many tokens (end token included); defaults to
            the bundle's ``max_length`` and may not exceed it.
        strict: refuse bundles whose recorded parity check failed.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        spinning: let those threads spin-wait between runs (off for servers).

    Raises:
        BundleError: missing/corrupt bundle, hash mismatch, failed parity with ``strict``.
        ProviderError: a requested provider is not available.
        InputError: unknown precision or bad ``max_length``.
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        providers: Sequence[str] | str | None = None,
        *,
        precision: str = "fp32",
        verify: bool = True,
        max_length: int | None = None,
        strict: bool = True,
        threads: int | None = None,
        spinning: bool = True,
    ) -> None:
        manifest = read_manifest(bundle)
        if manifest.family != "qwen3":
            raise BundleError(f"'{bundle}' holds a '{manifest.family}' bundle, not a text model",
                              hint="Use the embedder for that family")
        if manifest.task != "embed":
            raise BundleError(f"'{bundle}' holds a {manifest.task} bundle, which computes "
                              "scores, not embeddings",
                              hint="Load it with qwen3emb.runtime.Reranker")
        model = checked_model(manifest, bundle, precision, verify=verify, strict=strict)
        limit = manifest.max_length
        if max_length is not None and not 2 <= max_length <= limit:
            raise InputError(f"max_length={max_length} is outside 2..{limit} for this bundle",
                             hint=f"Choose a value up to the bundle's max_length {limit}")
        self.manifest = manifest
        self.precision = precision
        self.max_length = max_length or limit
        self.dim = int(manifest.embedding["output_dim"])
        self.mrl_min = manifest.mrl_min
        self.tokenizer, self.pad_id = load_tokenizer(manifest, self.max_length)
        self.session = open_session(manifest.root / model["path"], providers, threads,
                                    spinning=spinning, precision=precision if strict else None)

    @property
    def providers(self) -> list[str]:
        """Providers the session actually runs on."""
        return list(self.session.get_providers())

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to ``max_length`` with the end token last."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def tokenize_with_truncation(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text (as :meth:`tokenize`) and whether each text was cut to fit."""
        encodings = self.tokenizer.encode_batch(list(texts))
        return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]

    def run_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the graph on already padded int64 arrays → [batch, dim] float32."""
        feeds = {INPUT_IDS: input_ids.astype(np.int64, copy=False),
                 ATTENTION_MASK: attention_mask.astype(np.int64, copy=False)}
        # Only the pooled output: the graph's second one (last_hidden_state) is for other
        # loaders (docs/interop.md).
        return np.asarray(self.session.run([SENTENCE_EMBEDDING], feeds)[0], dtype=np.float32)

    def pad(self, ids: Sequence[Sequence[int]], side: str = "right"
            ) -> tuple[np.ndarray, np.ndarray]:
        """Pad token id lists to one length with the pad (end) token; mask marks real tokens."""
        width = max(len(row) for row in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(ids):
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            input_ids[i, span] = row
            mask[i, span] = 1
        return input_ids, mask

    def encode(self, texts: Sequence[str], *, dimensions: int | None = None,
               batch_size: int = 32) -> np.ndarray:
        """Embed texts as they are (documents get no instruction).

        Args:
            texts: non-empty strings.
            dimensions: Matryoshka width (``mrl_min..dim``); the vector is cut, then re-normalized.
            batch_size: texts per onnxruntime call; batches group similar lengths.

        Returns:
            float32 array [len(texts), dimensions or dim], unit L2 norm per row.

        Raises:
            InputError: empty list, empty string, non-string, bad dimensions or batch_size.
        """
        items = check_texts(texts)
        check_dimensions(dimensions, dim=self.dim, mrl_min=self.mrl_min)
        return self.encode_tokens(self.tokenize(items), dimensions=dimensions,
                                  batch_size=batch_size)

    def encode_tokens(self, ids: Sequence[Sequence[int]], *, dimensions: int | None = None,
                      batch_size: int = 32) -> np.ndarray:
        """Embed texts already tokenized by :meth:`tokenize`; :meth:`encode` is this after it.

        Args:
            ids: token ids per text, each ending with the end token.
            dimensions: Matryoshka width (``mrl_min..dim``).
            batch_size: texts per onnxruntime call; batches group similar lengths, so a text's
                batch mates (and with them the last bits of its vector) depend only on ``ids``.

        Returns:
            float32 array [len(ids), dimensions or dim], unit L2 norm per row.

        Raises:
            InputError: bad dimensions or batch_size.
        """
        width = check_dimensions(dimensions, dim=self.dim, mrl_min=self.mrl_min)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for batch in length_batches([len(r) for r in ids], batch_size):
            out[batch] = self.run_ids(*self.pad([ids[i] for i in batch]))
        return out if width == self.dim else truncate_normalize(out, width)

    def encode_queries(self, queries: Sequence[str], task: str | None = None, *,
                       dimensions: int | None = None, batch_size: int = 32) -> np.ndarray:
        """Embed queries with the instruction ``Instruct: {task}\\nQuery:{query}``.

        ``task`` defaults to the model card's web-search task.
        """
        items = check_texts(queries)
        if task is not None and not task.strip():
            raise InputError("task is empty", hint="Omit it to use the default task")
        template = self.manifest.prompt.get("query_template")
        formatted = [format_query(q, task, template) if template else format_query(q, task)
                     for q in items]
        return self.encode(formatted, dimensions=dimensions, batch_size=batch_size)

    def encode_documents(self, documents: Sequence[str], *, dimensions: int | None = None,
                         batch_size: int = 32) -> np.ndarray:
        """Embed documents (no instruction), same as :meth:`encode`."""
        return self.encode(documents, dimensions=dimensions, batch_size=batch_size)
