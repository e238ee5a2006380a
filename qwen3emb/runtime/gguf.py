"""Embed text with a GGUF through llama.cpp: the twin of the ONNX ``TextEmbedder``.

llama.cpp appends ``<|endoftext|>`` itself (the GGUF's ``add_eos_token``) and pools the last
token (``pooling_type`` LAST); this module adds the rest of the contract: a physical batch
(n_ubatch) as long as the longest input instead of llama.cpp's default 512, truncation that
keeps the end token last, the query instruction and Matryoshka truncation. Needs only numpy
and the ``gguf`` extra (llama-cpp-python); never torch or transformers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from qwen3emb.constants import END_TOKEN, TEXT_MRL_MIN
from qwen3emb.errors import BundleError, InputError, Qwen3EmbError
from qwen3emb.manifest import Manifest, read_manifest
from qwen3emb.runtime._llama import (
    NativeHandle,
    embedding_context,
    last_llama_errors,
    llama_library,
)
from qwen3emb.runtime.common import (
    check_dimensions,
    check_texts,
    format_query,
    length_batches,
    truncate_normalize,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

GGUF_PREFERENCE = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
"""Highest precision first: the type a bundle directory opens with by default."""

TOKEN_BUDGET = 2048
"""Tokens per llama_decode call when packing several short texts together."""

_MAX_LENGTH_KEY = b"qwen3emb.max_length"
_NORMALIZER_KEY = b"qwen3emb.normalizer"
_NormalForm = Literal["NFC", "NFD", "NFKC", "NFKD"]
_NORMAL_FORMS: dict[str, _NormalForm] = {"NFC": "NFC", "NFD": "NFD", "NFKC": "NFKC",
                                         "NFKD": "NFKD"}


def resolve_gguf(path_or_bundle: str | os.PathLike[str],
                 gguf_type: str | None = None) -> tuple[Path, Manifest | None]:
    """Find the GGUF file to load: the path itself, or one listed in a bundle's manifest.

    Raises:
        BundleError: not a file or bundle, or a bundle without GGUF models.
        InputError: ``gguf_type`` is not in the bundle, or was given with a file path.
    """
    path = Path(path_or_bundle)
    if path.is_file():
        if gguf_type is not None:
            raise InputError(f"gguf_type={gguf_type!r} applies to bundle directories only",
                             hint=f"Drop gguf_type, or pass the bundle directory, not '{path}'")
        return path, None
    if not path.is_dir():
        raise BundleError(f"'{path}' is neither a .gguf file nor a bundle directory",
                          hint="Pass model-<type>.gguf or the directory written by the export")
    manifest = read_manifest(path)
    models = manifest.models("gguf")
    if not models:
        raise BundleError(f"bundle '{path}' has no GGUF model",
                          hint="Re-export it with --format gguf")
    if gguf_type is None:
        gguf_type = next((t for t in GGUF_PREFERENCE if t in models), min(models))
    elif gguf_type not in models:
        raise InputError(f"bundle '{path}' has no GGUF of type {gguf_type!r}",
                         hint=f"Available: {', '.join(sorted(models))}")
    return path / models[gguf_type]["path"], manifest


class LlamaPooled(NativeHandle):
    """A GGUF loaded in llama.cpp, run in embedding mode with ``pooling`` over each sequence:
    the plumbing the embedder and the reranker share.

    One llama.cpp context per instance, so an instance is not thread-safe.

    Raises:
        MissingDependencyError: llama-cpp-python is not installed (``gguf`` extra).
        BundleError: the file does not load.
    """

    pooling = "LLAMA_POOLING_TYPE_LAST"
    """The ``llama_pooling_type`` of the contexts, by name in llama-cpp-python."""

    def __init__(self, path: Path, n_threads: int | None) -> None:
        self.path = path
        self._lib = lib = llama_library()
        self._ctx: Any = None
        self._ctx_shape = (0, 0)
        self.n_threads = int(n_threads or os.cpu_count() or 1)
        params = lib.llama_model_default_params()
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise BundleError(f"llama.cpp could not load '{self.path}': "
                              f"{last_llama_errors() or 'no message'}",
                              hint="Re-export the GGUF with this version of qwen3emb-export")
        self._vocab = lib.llama_model_get_vocab(self._model)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts."""
        return int(self._lib.llama_vocab_n_tokens(self._vocab))

    def close(self) -> None:
        """Free the llama.cpp context and model (also done on garbage collection)."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def _meta(self, key: bytes) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_model_meta_val_str(self._model, key, buf, len(buf))
        return buf.value.decode("utf-8") if n >= 0 else None

    def _context(self, n_tokens: int, n_seqs: int) -> Any:
        """A context whose n_ctx = n_batch = n_ubatch holds the whole batch in one pass."""
        lib = self._lib
        want_tokens = max(n_tokens, self._ctx_shape[0])
        want_seqs = max(n_seqs, self._ctx_shape[1])
        if self._ctx and (want_tokens, want_seqs) == self._ctx_shape:
            return self._ctx
        if self._ctx:
            lib.llama_free(self._ctx)
            self._ctx = None
        size = -(-want_tokens // 256) * 256
        self._ctx = embedding_context(lib, self._model, size, want_seqs, self.n_threads,
                                      hint="Lower batch_size or max_length, or free memory",
                                      pooling=getattr(lib, self.pooling))
        self._ctx_shape = (want_tokens, want_seqs)
        return self._ctx

    def _pooled(self, seqs: list[list[int]], width: int) -> np.ndarray:
        """Run one llama_decode over several sequences; return their ``width`` pooled
        outputs each (the hidden state, or a reranker's classifier outputs)."""
        lib = self._lib
        total = sum(len(s) for s in seqs)
        ctx = self._context(total, min(len(seqs), int(lib.llama_max_parallel_sequences())))
        batch = lib.llama_batch_init(total, 0, 1)
        try:
            i = 0
            for seq_id, tokens in enumerate(seqs):
                for pos, token in enumerate(tokens):
                    batch.token[i] = token
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq_id
                    batch.logits[i] = 1  # pooling reads every token's output
                    i += 1
            batch.n_tokens = total
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            status = lib.llama_decode(ctx, batch)
            if status != 0:
                raise Qwen3EmbError(f"llama.cpp failed on a batch of {len(seqs)} inputs "
                                    f"(llama_decode returned {status}): "
                                    f"{last_llama_errors() or 'no message'}",
                                    hint="Lower batch_size")
            out = np.empty((len(seqs), width), dtype=np.float32)
            for seq_id in range(len(seqs)):
                pooled = lib.llama_get_embeddings_seq(ctx, seq_id)
                if not pooled:
                    raise Qwen3EmbError("llama.cpp returned no pooled output",
                                        hint=f"Check the GGUF's pooling_type ({self.pooling})")
                out[seq_id] = np.ctypeslib.as_array(pooled, shape=(width,))
            return out
        finally:
            lib.llama_batch_free(batch)


class GGUFTextEmbedder(LlamaPooled):
    """Qwen3-Embedding on llama.cpp: unit-norm float32 vectors, last-token pooled.

    One llama.cpp context per instance, so an instance is not thread-safe.

    Args:
        path_or_bundle: a ``model-<type>.gguf`` file or a bundle directory.
        gguf_type: which GGUF of a bundle to load; default the highest precision present.
        n_threads: llama.cpp threads; default all cores.
        max_length: truncate inputs to this many tokens (end token included); at most the
            bundle's max_length.

    Raises:
        MissingDependencyError: llama-cpp-python is not installed (``gguf`` extra).
        BundleError: the file does not load, or lacks ``add_eos_token`` (it would embed
            without the end token and be silently wrong).
    """

    def __init__(self, path_or_bundle: str | os.PathLike[str], *, gguf_type: str | None = None,
                 n_threads: int | None = None, max_length: int | None = None) -> None:
        path, manifest = resolve_gguf(path_or_bundle, gguf_type)
        super().__init__(path, n_threads)
        lib = self._lib
        self.dim = int(lib.llama_model_n_embd(self._model))
        self.end_id = int(lib.llama_vocab_eos(self._vocab))
        end_text = lib.llama_vocab_get_text(self._vocab, self.end_id).decode("utf-8", "replace")
        if not lib.llama_vocab_get_add_eos(self._vocab) or end_text != END_TOKEN:
            self.close()
            raise BundleError(
                f"'{self.path}' does not make llama.cpp append {END_TOKEN} (add_eos_token "
                f"unset or eos is {end_text!r}), so its embeddings would be wrong",
                hint="Re-export it with qwen3emb-export, which sets add_eos_token",
            )
        self.mrl_min = manifest.mrl_min if manifest else TEXT_MRL_MIN
        n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
        stored = self._meta(_MAX_LENGTH_KEY)
        self.max_length = (manifest.max_length if manifest
                           else int(stored) if stored else n_ctx_train)
        if max_length is not None:
            if not 2 <= max_length <= self.max_length:
                self.close()
                raise InputError(f"max_length={max_length} is outside 2..{self.max_length}",
                                 hint=f"Choose a value up to {self.max_length}")
            self.max_length = max_length
        form = self._meta(_NORMALIZER_KEY)
        if form is not None and form not in _NORMAL_FORMS:
            self.close()
            raise BundleError(f"'{self.path}' asks for the unknown normal form {form!r}",
                              hint="Re-export it with this version of qwen3emb-export")
        self.normalizer: _NormalForm | None = _NORMAL_FORMS[form] if form else None
        if manifest is not None and manifest.dim != self.dim:
            self.close()
            raise BundleError(f"'{self.path}' has width {self.dim}, the manifest says "
                              f"{manifest.dim}", hint="Re-export the bundle")

    # --- public API, the same as the ONNX TextEmbedder ---------------------------------------
    def encode(self, texts: Sequence[str], *, dimensions: int | None = None,
               batch_size: int = 32) -> np.ndarray:
        """Embed texts as they are (no instruction).

        Args:
            texts: non-empty strings.
            dimensions: Matryoshka width (``mrl_min..dim``); default the full width.
            batch_size: texts per llama.cpp call.

        Returns:
            float32 array ``[len(texts), dimensions]`` of unit-norm rows.

        Raises:
            InputError: bad texts, dimensions or batch_size.
        """
        items = check_texts(texts)
        width = check_dimensions(dimensions, dim=self.dim, mrl_min=self.mrl_min)
        seqs = [self.tokenize(text) for text in items]
        lengths = [len(s) for s in seqs]
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for batch in length_batches(lengths, batch_size):
            for chunk in _split_by_tokens(batch, lengths, TOKEN_BUDGET):
                out[chunk] = self._embed([seqs[i] for i in chunk])
        return truncate_normalize(out, width)

    def encode_queries(self, queries: Sequence[str], task: str | None = None, *,
                       dimensions: int | None = None, batch_size: int = 32) -> np.ndarray:
        """Embed queries with the instruction ``Instruct: {task}\\nQuery:{query}``."""
        items = check_texts(queries)
        return self.encode([format_query(q, task) for q in items], dimensions=dimensions,
                           batch_size=batch_size)

    def encode_documents(self, docs: Sequence[str], *, dimensions: int | None = None,
                         batch_size: int = 32) -> np.ndarray:
        """Embed documents (no instruction)."""
        return self.encode(docs, dimensions=dimensions, batch_size=batch_size)

    def embed_ids(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed token-id lists as they are (end token included by the caller).

        Returns:
            float32 ``[len(seqs), dim]`` of unit-norm rows, full width.
        """
        lengths = [len(s) for s in seqs]
        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        for chunk in _split_by_tokens(list(range(len(seqs))), lengths, TOKEN_BUDGET):
            out[chunk] = self._embed([list(seqs[i]) for i in chunk])
        return truncate_normalize(out, self.dim)

    def tokenize(self, text: str, *, truncate: bool = True) -> list[int]:
        """Token ids as llama.cpp will see them: end token last, at most ``max_length``
        (``truncate=False``: every token, to count them)."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        data = text.encode("utf-8")
        lib = self._lib
        capacity = len(data) + 8
        ids = (lib.llama_token * capacity)()
        # add_special appends <|endoftext|> (add_eos_token); parse_special matches added
        # tokens in the text as the Hugging Face tokenizer does.
        n = lib.llama_tokenize(self._vocab, data, len(data), ids, capacity, True, True)
        if n < 0:
            capacity = -n
            ids = (lib.llama_token * capacity)()
            n = lib.llama_tokenize(self._vocab, data, len(data), ids, capacity, True, True)
        tokens = list(ids[:n])
        if truncate and len(tokens) > self.max_length:  # cut the text, keep the end token
            tokens = tokens[:self.max_length - 1] + tokens[-1:]
        return tokens

    def _embed(self, seqs: list[list[int]]) -> np.ndarray:
        """Run one llama_decode over several sequences; return their pooled hidden states."""
        return self._pooled(seqs, self.dim)


def _split_by_tokens(batch: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Cut a batch (longest first) so each piece has at most ``budget`` tokens, or one text."""
    pieces: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in batch:
        if current and used + lengths[i] > budget:
            pieces.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        pieces.append(current)
    return pieces
