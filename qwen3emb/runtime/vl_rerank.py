"""VLReranker: score query/document pairs of text, images and videos with a Qwen3-VL reranker
bundle (vision.onnx + decoder.onnx). No torch.

    >>> from qwen3emb.runtime import VLReranker
    >>> reranker = VLReranker("bundle/")
    >>> reranker.score({"text": "a red sofa"}, [{"image": "sofa.png"}, {"text": "a cat"}])

The prompt is the released ``Qwen3VLReranker``'s: a fixed system message, then one user turn
``<Instruct>: {instruction}<Query>:{query}\\n<Document>:{document}``, each side its videos,
images and text in that order (``NULL`` when it has none), then the generation prompt. The
prompt but its last five tokens is cut to ``max_length`` keeping every special token (so
images and videos are never cut). Images and videos go through the embedder's host
preprocessing; the decoder reads each row's last real token, so a document's score does not
depend on its batch mates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwen3emb.constants import LOGITS, SCORE, VL_MAX_PIXELS, VL_MAX_SOURCE_PIXELS, VL_MIN_PIXELS
from qwen3emb.errors import InputError
from qwen3emb.manifest import Manifest, read_manifest
from qwen3emb.runtime.common import check_loadable, length_batches
from qwen3emb.runtime.rerank import PairScorer
from qwen3emb.runtime.session import open_session
from qwen3emb.runtime.vl import (
    PreparedItem,
    VLInputs,
    check_vl_bundle,
    choose_graphs,
)
from qwen3emb.runtime.vl_prompt import (
    mrope_positions,
    render_rerank_prompt,
    render_rerank_side,
    truncate_keeping_special,
)

logger = logging.getLogger(__name__)


def as_item(value: Any, name: str) -> Mapping[str, Any]:
    """A query or document as an item: a string is its text; dicts pass as they are.

    Raises:
        InputError: anything else, naming it.
    """
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, Mapping):
        return value
    raise InputError(f"{name} is a {type(value).__name__}, not a string or a dict",
                     hint="Pass a string, or a dict with 'text', 'image' and/or 'video'")


class VLRerankInputs(VLInputs):
    """Everything before the decoder for reranker pairs: the released prompt, its truncation,
    M-RoPE positions and the vision graph; the exporter calibrates the int8 decoder on it.

    Args:
        manifest, vision_graph, providers, threads, spinning, min_pixels, max_pixels,
        max_frames, fps, video_max_pixels, max_source_pixels: as for
        :class:`qwen3emb.runtime.vl.VLInputs`.
        max_length: the prompt's limit before its last tokens (default: the bundle's).
    """

    def __init__(self, manifest: Manifest, vision_graph: Mapping[str, Any],
                 providers: Sequence[str] | str | None = None, *,
                 max_length: int | None = None, **options: Any) -> None:
        super().__init__(manifest, vision_graph, providers, max_tokens=max_length, **options)
        rerank = manifest.rerank
        self.system = str(rerank["system"])
        self.default_instruction = str(rerank["default_instruction"])
        self.query_prefix = str(rerank["query_prefix"])
        self.document_prefix = str(rerank["document_prefix"])
        self.tail = int(rerank["tail_tokens"])
        # The recipe keeps the tokenizer's special ids; the visual placeholders are kept in
        # any case (a tokenizer whose special ids lacked them would make the recipe fail).
        self.special = frozenset([*(int(i) for i in manifest.tokenizer["special_ids"]),
                                  self.image_token_id, self.video_token_id,
                                  int(manifest.tokenizer["vision_start_token_id"]),
                                  int(manifest.tokenizer["vision_end_token_id"])])

    def side(self, value: Any, name: str, prefix: str) -> tuple[str, list[Any]]:
        """One side's rendered text and its visuals."""
        text, visuals = self.item_parts(as_item(value, name), name)
        return render_rerank_side(prefix, text, visuals), visuals

    def prepare_pair(self, query: tuple[str, list[Any]], document: Any, index: int,
                     instruction: str, name: str | None = None) -> PreparedItem:
        """Preprocess document ``index`` against an already prepared query side.

        Raises:
            InputError: naming the document (``name``, default ``document {index}``) and the
                input that failed.
        """
        doc_text, doc_visuals = self.side(document, name or f"document {index}",
                                          self.document_prefix)
        visuals = [*query[1], *doc_visuals]
        prompt = render_rerank_prompt(self.system, instruction, query[0], doc_text)
        ids, cut = truncate_keeping_special(self.tokenizer.encode(prompt).ids, self.max_tokens,
                                            self.special, self.tail)
        positions = mrope_positions(ids, visuals, image_token_id=self.image_token_id,
                                    video_token_id=self.video_token_id,
                                    merge_size=self.geometry.merge_size)
        return PreparedItem(ids, positions, visuals, cut)

    def instruction(self, instruction: Any) -> str:
        """The instruction as the released code uses it: the default when ``None`` or empty.

        Raises:
            InputError: not a string.
        """
        if instruction is not None and not isinstance(instruction, str):
            raise InputError(f"instruction is a {type(instruction).__name__}, not a string",
                             hint="Pass a string, or None for the default instruction")
        return instruction or self.default_instruction

    def prepare_pairs(self, query: Any, documents: Any, instruction: Any = None
                      ) -> list[PreparedItem]:
        """Every (query, document) pair, preprocessed; the query's visuals are decoded once.

        Raises:
            InputError: a bad query, a bare string or dict for ``documents``, a bad document.
        """
        if isinstance(documents, (str, Mapping)):
            raise InputError("expected a list of documents, got a single one",
                             hint="Wrap it in a list: score(query, [document])")
        task = self.instruction(instruction)
        side = self.side(query, "query", self.query_prefix)
        return [self.prepare_pair(side, d, i, task) for i, d in enumerate(documents)]


class VLReranker(VLRerankInputs, PairScorer):
    """Score documents against a query with a Qwen3-VL reranker bundle (``export --task
    rerank`` of a qwen3_vl checkpoint). Query and documents are strings or dicts with any of
    ``text``, ``image`` (path, bytes or PIL image) and ``video`` (file path or frame list).

    Args:
        bundle: the bundle directory.
        providers: onnxruntime providers (``"cpu"``, ``"cuda"``, ...); CPU when ``None``.
        precision: which decoder of the bundle to run (``fp32``, ``fp16``, ``int8``, ``int4``).
        vision_precision: which vision graph feeds it (default: the one the exporter paired
            with that decoder and validated with it).
        threads: onnxruntime intra-op threads.
        max_length: the prompt's limit before its last five tokens (default and upper bound:
            the bundle's, the released 10240).
        verify: check every file's sha256 against the manifest on load.
        strict: refuse bundles whose recorded parity check failed.
        spinning: let onnxruntime's threads spin-wait between runs (off for servers).
        min_pixels, max_pixels, max_frames, fps, video_max_pixels, max_source_pixels: as for
            :class:`qwen3emb.runtime.VLEmbedder` (the released values by default).

    Raises:
        BundleError: not a Qwen3-VL reranker bundle, missing/corrupt files, failed parity with
            ``strict``.
        InputError: unknown precision, a limit out of range.
    """

    def __init__(self, bundle: str | os.PathLike[str],
                 providers: Sequence[str] | str | None = None, *, precision: str = "fp32",
                 vision_precision: str | None = None, threads: int | None = None,
                 max_length: int | None = None, verify: bool = True, strict: bool = True,
                 spinning: bool = True, min_pixels: int = VL_MIN_PIXELS,
                 max_pixels: int = VL_MAX_PIXELS, max_frames: int | None = None,
                 fps: float | None = None, video_max_pixels: int | None = None,
                 max_source_pixels: int = VL_MAX_SOURCE_PIXELS) -> None:
        manifest = read_manifest(bundle)
        check_vl_bundle(manifest, bundle, "rerank")
        check_loadable(manifest, bundle, verify=verify, strict=strict)
        decoder, vision_graph = choose_graphs(manifest, precision, vision_precision)
        limit = manifest.max_length
        if max_length is not None and not 16 <= max_length <= limit:
            raise InputError(f"max_length={max_length} is outside 16..{limit} for this bundle",
                             hint=f"Choose a value up to the bundle's max_length {limit}")
        super().__init__(manifest, vision_graph, providers, max_length=max_length,
                         threads=threads, spinning=spinning, min_pixels=min_pixels,
                         max_pixels=max_pixels, max_frames=max_frames, fps=fps,
                         video_max_pixels=video_max_pixels, max_source_pixels=max_source_pixels)
        self.precision = precision
        self.max_length = self.max_tokens
        self.decoder = open_session(manifest.root / decoder["path"], providers, threads,
                                    spinning=spinning, precision=precision if strict else None)

    @property
    def providers(self) -> list[str]:
        """Where the decoder runs (the vision graph runs on the same)."""
        return list(self.decoder.get_providers())

    def score_prepared(self, prepared: Sequence[PreparedItem], *, batch_size: int = 8
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and logits (float32, one each per pair) of pairs from :meth:`prepare_pairs`.
        Batches group similar lengths."""
        scores = np.empty(len(prepared), dtype=np.float32)
        logits = np.empty(len(prepared), dtype=np.float32)
        for batch in length_batches([len(p.ids) for p in prepared], batch_size):
            chosen = [prepared[j] for j in batch]
            feeds = self.decoder_inputs(chosen, self.encode_visuals(chosen))
            score, logit = self.decoder.run([SCORE, LOGITS], feeds)
            scores[batch] = np.asarray(score, np.float32).reshape(-1)
            logits[batch] = np.asarray(logit, np.float32).reshape(-1)
        return scores, logits

    def score(self, query: Any, documents: Sequence[Any],  # type: ignore[override]
              instruction: str | None = None, *, batch_size: int = 8) -> np.ndarray:
        """How well each document meets the query, in (0, 1), one float32 per document in order.

        Args:
            query: a string or a dict with ``text``, ``image`` and/or ``video``.
            documents: strings or such dicts (may be empty).
            instruction: the task (default: the released reranker's).
            batch_size: pairs per decoder call (a pair's score never depends on it).

        Raises:
            InputError: a bad query or document (naming it), bad ``batch_size``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        prepared = self.prepare_pairs(query, documents, instruction)
        if not prepared:
            return np.empty(0, dtype=np.float32)
        return self.score_prepared(prepared, batch_size=batch_size)[0]
