"""The reranker side of the server: the runtime's ``Reranker`` behind the backend interface.

A pair becomes one :class:`~qwen3emb.serve.backend.Prepared` sequence (the model card's prompt,
content cut longest first to the token limit, prefix and suffix never cut), and a call returns
one row per pair: ``[score, logit]``. The same batcher that forms embedding batches forms
these, so a pair's score never depends on the pairs it ran with (fp32/fp16 graphs, and the
searched int8/int4 whose activations are per row; see ``BATCH_INDEPENDENT_ONNX``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3emb.manifest import Manifest, sha256_file
from qwen3emb.serve.backend import WARMUP_TEXT, Backend, LlamaCppRuntime, Prepared
from qwen3emb.serve.schemas import ApiError
from qwen3emb.serve.settings import ServeSettings

ROW = ("score", "logit")
"""What each row of :meth:`RerankBackend.run` holds."""


class RerankBackend(Backend):
    """Qwen3-Reranker through the ONNX ``Reranker``."""

    kind = "rerank"

    def __init__(self, reranker: Any, manifest: Manifest, settings: ServeSettings,
                 precision: str) -> None:
        super().__init__(reranker, manifest, settings, precision)
        self.prompt = reranker.prompt

    def widths(self, manifest: Manifest) -> tuple[int, int]:
        return len(ROW), len(ROW)

    def model_file(self) -> dict[str, Any]:
        return self.manifest.models("gguf" if self.runtime == "llama.cpp" else "onnx")[
            self.precision]

    def info(self) -> dict[str, Any]:
        entry = self.model_file()
        rerank = self.manifest.rerank
        return {"family": self.manifest.family, "kind": self.kind, "runtime": self.runtime,
                "precision": self.precision, "providers": self.providers,
                "max_tokens": self.max_tokens,
                "default_instruction": rerank["default_instruction"],
                "bundle_sha256": sha256_file(self.manifest.root / "manifest.json"),
                "model_file": entry["path"], "model_sha256": entry["sha256"],
                "one_sequence_per_call": self.single_sequence}

    def prepare(self, items: list[Any], *, input_type: str | None,
                instruction: str | None, truncate: bool) -> list[Prepared]:
        raise ApiError(400, "this model is a reranker; POST /v1/rerank (or /v2/rerank, "
                       "/rerank) with a query and documents", param="model",
                       code="wrong_model_kind")

    def prepare_pairs(self, query: str, documents: Sequence[str], *,
                      instruction: str | None, truncate: bool, param: str = "documents"
                      ) -> list[Prepared]:
        """The model card's prompt for each (query, document) pair (``param``: the request
        field errors name).

        Raises:
            ApiError: 400 for an empty instruction; 413 for a pair above the token limit with
                ``truncate`` false (its content would have been cut).
        """
        if instruction is not None and not instruction.strip():
            raise ApiError(400, "instruction is empty; omit it to use the model card's default",
                           param="instruction", code="invalid_instruction")
        ids, cut = self.prompt.pair_ids(query, list(documents), instruction)
        if not truncate and any(cut):
            i = cut.index(True)
            raise ApiError(413, f"{param}[{i}] with the query is above this server's limit "
                           f"of {self.max_tokens} tokens per pair; shorten it, or send "
                           "truncate: true to cut it the model card's way (longest first)",
                           param=f"{param}[{i}]", code="input_too_long")
        return [Prepared(len(row), row, doc, flag)
                for row, doc, flag in zip(ids, documents, cut)]

    def warmup_inputs(self) -> list[Prepared]:
        return self.prepare_pairs(WARMUP_TEXT, [WARMUP_TEXT], instruction=None, truncate=True)

    def run(self, batch: Sequence[Prepared]) -> np.ndarray:
        """Score ``batch`` in one call → float32 ``[len(batch), 2]``: score, logit."""
        seqs = [p.payload for p in batch]
        if self.runtime == "llama.cpp":
            return np.stack(self.embedder.run_ids(seqs), axis=1)
        width = max(len(s) for s in seqs)
        input_ids = np.full((len(seqs), width), self.embedder.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for j, row in enumerate(seqs):  # right padding: the graph reads the last real token
            input_ids[j, :len(row)] = row
            mask[j, :len(row)] = 1
        score, logit = self.embedder.run_ids(input_ids, mask)
        return np.stack([score, logit], axis=1)


class VLRerankBackend(RerankBackend):
    """Qwen3-VL-Reranker through the ONNX ``VLReranker``: queries and documents of text,
    images and videos (``data:`` URIs, or files under ``--allow-files``)."""

    kind = "vl-rerank"

    def __init__(self, reranker: Any, manifest: Manifest, settings: ServeSettings,
                 precision: str) -> None:
        Backend.__init__(self, reranker, manifest, settings, precision)

    @property
    def providers(self) -> list[str]:
        return list(self.embedder.decoder.get_providers())

    def model_file(self) -> dict[str, Any]:
        from qwen3emb.runtime.vl import choose_graphs

        return choose_graphs(self.manifest, self.precision)[0]

    def prepare_pairs(self, query: Any, documents: Sequence[Any], *,
                      instruction: str | None, truncate: bool, param: str = "documents"
                      ) -> list[Prepared]:
        """The released reranker's prompt for each pair, its images and videos decoded.

        Raises:
            ApiError: 400 for an empty instruction, unreadable media, remote URLs and files
                outside ``--allow-files``; 413 for a pair above the token limit with
                ``truncate`` false.
        """
        from qwen3emb.errors import InputError
        from qwen3emb.serve.backend import _media

        if instruction is not None and not instruction.strip():
            raise ApiError(400, "instruction is empty; omit it to use the default",
                           param="instruction", code="invalid_instruction")
        reranker = self.embedder
        task = reranker.instruction(instruction)
        out: list[Prepared] = []
        raw_query = {"text": query} if isinstance(query, str) else dict(query)
        with _media(raw_query, -1, self.settings.allow_files, "query") as resolved:
            try:
                side = reranker.side(resolved, "query", reranker.query_prefix)
            except InputError as e:
                raise ApiError(400, e.one_line(), param="query", code="invalid_input") from None
            for i, document in enumerate(documents):
                raw = {"text": document} if isinstance(document, str) else dict(document)
                with _media(raw, i, self.settings.allow_files, param) as doc:
                    try:
                        prepared = reranker.prepare_pair(side, doc, i, task, f"{param}[{i}]")
                    except InputError as e:
                        raise ApiError(400, e.one_line(),
                                       param=f"{param}[{i}]", code="invalid_input") from None
                if prepared.truncated and not truncate:
                    raise ApiError(413, f"{param}[{i}] with the query is above this server's "
                                   f"limit of {self.max_tokens} tokens per pair; shorten it, or "
                                   "send truncate: true to cut it the released reranker's way "
                                   "(special tokens kept)", param=f"{param}[{i}]",
                                   code="input_too_long")
                out.append(Prepared(len(prepared.ids), prepared, raw.get("text"),
                                    prepared.truncated))
        return out

    def run(self, batch: Sequence[Prepared]) -> np.ndarray:
        """Score ``batch`` in one call → float32 ``[len(batch), 2]``: score, logit."""
        scores, logits = self.embedder.score_prepared([p.payload for p in batch],
                                                      batch_size=len(batch))
        return np.stack([scores, logits], axis=1)


class GGUFRerankBackend(LlamaCppRuntime, RerankBackend):
    """Qwen3-Reranker GGUF through llama.cpp's rank pooling (``GGUFReranker``)."""


def load_reranker(settings: ServeSettings, manifest: Manifest) -> RerankBackend:
    """Open a reranker bundle (``export --task rerank``) for serving: an ONNX precision on
    onnxruntime, or a GGUF type on llama.cpp.

    Raises:
        BundleError, InputError, ProviderError: from the runtime.
    """
    from qwen3emb.runtime import GGUFReranker, VLReranker, open_reranker

    reranker = open_reranker(settings.bundle, settings.precision,
                             list(settings.providers) or None, threads=settings.threads,
                             max_length=settings.max_tokens, spinning=False)
    if isinstance(reranker, GGUFReranker):
        return GGUFRerankBackend(reranker, manifest, settings, reranker.gguf_type)
    if isinstance(reranker, VLReranker):
        return VLRerankBackend(reranker, manifest, settings, reranker.precision)
    return RerankBackend(reranker, manifest, settings, reranker.precision)
