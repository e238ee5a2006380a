"""The inference side of the server: the runtime's embedders behind one small interface.

A backend turns request inputs into :class:`Prepared` sequences (instruction applied, end
token last, truncated or refused, tokens counted) and embeds a list of them in one call. It
never batches on its own: :mod:`qwen3emb.serve.batcher` decides what runs together.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.errors import InputError
from qwen3emb.manifest import Manifest, read_manifest, sha256_file
from qwen3emb.runtime.common import format_query
from qwen3emb.serve.schemas import ApiError, Input
from qwen3emb.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

WARMUP_TEXT = "warm-up"
BATCH_INDEPENDENT_ONNX = ("fp32", "fp16")
"""ONNX precisions whose rows never see each other: batched = single within 1.2e-7 (1 - cosine,
tiny bundle, 12 texts of 3..486 tokens; scripts/bench.py batch-independence). int8 and int4
graphs batch when their manifest entry says ``batch_independent`` (the searched ones, whose
int8 activations are per row). A fixed recipe (``--int8-scheme``) quantizes MatMul inputs with
one ``DynamicQuantizeLinear`` scale per call over the whole padded batch, so a row moves with
its batch mates: up to 1.1e-4 (int8) and 2.3e-4 (int4) there. Inside their floors, but a
server's answer should not depend on the traffic around it, so those run one sequence per
call unless the operator asks for batching (``--batch-sequences``). llama.cpp's GGUF types
scale activations per row block: f32 6e-8, q8_0 1.8e-5 batched vs single; batched."""


@dataclass
class Prepared:
    """One input ready to run: its token count and what the backend runs."""

    tokens: int
    payload: Any
    text: str | None = None
    truncated: bool = False


class Backend:
    """Common state and the parts of preparation shared by text and VL bundles."""

    kind = "text"
    runtime = "onnxruntime"

    def __init__(self, embedder: Any, manifest: Manifest, settings: ServeSettings,
                 precision: str) -> None:
        self.embedder = embedder
        self.manifest = manifest
        self.settings = settings
        self.precision = precision
        self.dim, self.mrl_min = self.widths(manifest)
        self.max_tokens = int(settings.max_tokens or manifest.max_length)
        if self.max_tokens > manifest.max_length:
            raise InputError(f"--max-tokens {self.max_tokens} is above the bundle's "
                             f"max_length {manifest.max_length}",
                             hint=f"Choose at most {manifest.max_length}")
        chosen = settings.single_sequence
        self.single_sequence = self.default_single_sequence() if chosen is None else chosen

    def widths(self, manifest: Manifest) -> tuple[int, int]:
        """Width of ``run``'s rows and the narrowest Matryoshka width (embedders)."""
        return int(manifest.embedding["output_dim"]), manifest.mrl_min

    def default_single_sequence(self) -> bool:
        """Whether batching would make a row depend on its batch mates: fp32/fp16 never, a
        searched int8/int4 graph not when its manifest says so (per-row activations only)."""
        if self.precision in BATCH_INDEPENDENT_ONNX:
            return False
        return self.model_file().get("settings", {}).get("batch_independent") is not True

    @property
    def providers(self) -> list[str]:
        return list(self.embedder.providers)

    @property
    def on_cpu(self) -> bool:
        """Whether inference runs on CPU only (small batches pay there)."""
        return self.runtime == "llama.cpp" or self.providers in (
            ["CPUExecutionProvider"], ["openvino:CPU"])

    def model_file(self) -> dict[str, Any]:
        """The manifest entry of the served model file."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What ``GET /info`` reports about the model."""
        entry = self.model_file()
        return {"family": self.manifest.family, "kind": self.kind, "runtime": self.runtime,
                "precision": self.precision, "providers": self.providers,
                "dimensions": self.dim, "matryoshka": [self.mrl_min, self.dim],
                "max_tokens": self.max_tokens,
                "bundle_sha256": sha256_file(self.manifest.root / "manifest.json"),
                "model_file": entry["path"], "model_sha256": entry["sha256"],
                "one_sequence_per_call": self.single_sequence}

    def instruction_for(self, input_type: str | None, instruction: str | None) -> str | None:
        """The task text of this request, or None for documents.

        Raises:
            ApiError: 400 for an empty instruction or one given for documents.
        """
        if instruction is not None and not instruction.strip():
            raise ApiError(400, "instruction is empty; omit it to use the default task",
                           param="instruction", code="invalid_instruction")
        if input_type == "document" and instruction is not None:
            raise ApiError(400, "instruction applies to queries, and input_type is 'document'; "
                           "drop one of them", param="instruction", code="invalid_instruction")
        if input_type == "query" or instruction is not None:
            return instruction or self.settings.default_task or ""
        return None

    def prepare(self, items: list[Input], *, input_type: str | None,
                instruction: str | None, truncate: bool) -> list[Prepared]:
        """Turn request items into sequences (see :class:`TextBackend`, :class:`VLBackend`)."""
        raise NotImplementedError

    def warmup_inputs(self) -> list[Prepared]:
        """One short input, run once before the server says it is ready."""
        return self.prepare([WARMUP_TEXT], input_type=None, instruction=None, truncate=True)

    def run(self, batch: Sequence[Prepared]) -> np.ndarray:
        """Embed ``batch`` in one call → float32 ``[len(batch), dim]`` unit-norm rows."""
        raise NotImplementedError

    def too_long(self, index: int, count: int) -> ApiError:
        return ApiError(413, f"input[{index}] has {count} tokens, above this server's limit of "
                        f"{self.max_tokens}; shorten it, or send truncate: true to cut it "
                        "(the end token is kept)", param=f"input[{index}]",
                        code="input_too_long")

    def close(self) -> None:
        close = getattr(self.embedder, "close", None)
        if close is not None:
            close()


class TextBackend(Backend):
    """Qwen3-Embedding: the ONNX ``TextEmbedder`` or the llama.cpp ``GGUFTextEmbedder``."""

    def __init__(self, embedder: Any, manifest: Manifest, settings: ServeSettings,
                 precision: str) -> None:
        super().__init__(embedder, manifest, settings, precision)
        self.end_id = int(manifest.tokenizer["end_token_id"])
        template = manifest.prompt.get("query_template")
        self.template = str(template) if template else None
        if self.runtime == "onnxruntime":
            from tokenizers import Tokenizer

            # A copy without truncation, so that over-long inputs can be counted and refused.
            self.tokenizer = Tokenizer.from_str(embedder.tokenizer.to_str())
            self.tokenizer.no_truncation()
            self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        else:
            self.vocab_size = int(embedder.vocab_size)
            if int(embedder.end_id) != self.end_id:
                raise InputError(f"the GGUF's end token {embedder.end_id} is not the "
                                 f"manifest's {self.end_id}", hint="Re-export the bundle")

    def model_file(self) -> dict[str, Any]:
        return self.manifest.models("gguf" if self.runtime == "llama.cpp" else "onnx")[
            self.precision]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Every token of each text, end token last, nothing cut."""
        if self.runtime == "onnxruntime":
            return [e.ids for e in self.tokenizer.encode_batch(texts)]
        return [self.embedder.tokenize(t, truncate=False) for t in texts]

    def prepare(self, items: list[Input], *, input_type: str | None,
                instruction: str | None, truncate: bool) -> list[Prepared]:
        """Apply the query template (or none), tokenize, check ids, cut or refuse long inputs.

        Token-id inputs run as given, with the end token appended when it is not last.

        Raises:
            ApiError: 400 for objects, out-of-vocabulary ids, ids sent as queries; 413 for an
                input above the token limit with ``truncate`` false.
        """
        task = self.instruction_for(input_type, instruction)
        texts = [i for i in items if isinstance(i, str)]
        if len(texts) < len(items) and task is not None:
            raise ApiError(400, "token-id inputs are used as given, so input_type 'query' and "
                           "instruction cannot apply; send the query as text",
                           param="input_type", code="invalid_input")
        if texts and task is not None:
            texts = [format_query(t, task or None, *([self.template] if self.template else []))
                     for t in texts]
        encoded = iter(self.tokenize(texts) if texts else [])
        text_iter = iter(texts)
        out: list[Prepared] = []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                raise ApiError(400, f"input[{i}] is an object, and {{text, image, video}} "
                               "objects need a Qwen3-VL bundle; send a string",
                               param=f"input[{i}]", code="invalid_input")
            text = next(text_iter) if isinstance(item, str) else None
            ids = next(encoded) if isinstance(item, str) else self._check_ids(item, i)
            truncated = len(ids) > self.max_tokens
            if truncated:
                if not truncate:
                    raise self.too_long(i, len(ids))
                ids = ids[:self.max_tokens - 1] + [self.end_id]
            out.append(Prepared(len(ids), ids, text, truncated))
        return out

    def _check_ids(self, ids: list[int], index: int) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"input[{index}] has token id {bad[0]}, outside this model's "
                           f"vocabulary 0..{self.vocab_size - 1}", param=f"input[{index}]",
                           code="invalid_token_id")
        return list(ids) if ids[-1] == self.end_id else [*ids, self.end_id]

    def run(self, batch: Sequence[Prepared]) -> np.ndarray:
        seqs = [p.payload for p in batch]
        if self.runtime == "llama.cpp":
            return self.embedder.embed_ids(seqs)
        return self.embedder.run_ids(*self.embedder.pad(seqs))


class LlamaCppRuntime:
    """What a backend on llama.cpp reports and how it batches (mixed into a backend class)."""

    runtime = "llama.cpp"

    @property
    def providers(self) -> list[str]:
        return ["llama.cpp CPU"]

    def default_single_sequence(self) -> bool:
        # llama.cpp quantizes activations per row block (q8_0/k-quants), never per batch.
        return False


class GGUFTextBackend(LlamaCppRuntime, TextBackend):
    """Qwen3-Embedding GGUF through llama.cpp (``GGUFTextEmbedder``)."""


class VLBackend(Backend):
    """Qwen3-VL-Embedding through the ONNX ``VLEmbedder``: text, image and video items."""

    kind = "vl"

    @property
    def providers(self) -> list[str]:
        return list(self.embedder.decoder.get_providers())

    def model_file(self) -> dict[str, Any]:
        from qwen3emb.runtime.vl import choose_graphs

        return choose_graphs(self.manifest, self.precision)[0]

    def prepare(self, items: list[Input], *, input_type: str | None,
                instruction: str | None, truncate: bool) -> list[Prepared]:
        """Render each item's prompt (system instruction, videos, images, text) and its visuals.

        Raises:
            ApiError: 400 for token ids, remote URLs, files outside ``--allow-files`` and
                unreadable media; 413 for an item above the token limit with ``truncate``
                false, or one whose truncation would cut its image.
        """
        from qwen3emb.runtime.vl_prompt import format_instruction, item_text, render_prompt

        task = self.instruction_for(input_type, instruction)
        system = format_instruction(task or None)
        out: list[Prepared] = []
        for i, item in enumerate(items):
            if isinstance(item, list):
                raise ApiError(400, f"input[{i}] is a token-id list; Qwen3-VL bundles take "
                               "strings and {text, image, video} objects",
                               param=f"input[{i}]", code="invalid_input")
            raw = {"text": item} if isinstance(item, str) else dict(item)
            with _media(raw, i, self.settings.allow_files) as resolved:
                try:
                    prepared = self.embedder.prepare(resolved, i, system)
                except InputError as e:
                    # The runtime refuses to cut an item's visual tokens: too large, not bad.
                    status = 413 if "max_tokens" in e.message else 400
                    raise ApiError(status, e.one_line(), param=f"input[{i}]",
                                   code="input_too_long" if status == 413 else "invalid_input"
                                   ) from None
            count, truncated = len(prepared.ids), False
            if count >= self.max_tokens:  # it may have been cut: count the whole prompt
                full = len(self.embedder.tokenizer.encode(render_prompt(
                    system, prepared.visuals,
                    item_text(raw.get("text"), bool(prepared.visuals)))).ids)
                truncated = full > count
                if truncated and not truncate:
                    raise self.too_long(i, full)
            out.append(Prepared(count, prepared, raw.get("text"), truncated))
        return out

    def run(self, batch: Sequence[Prepared]) -> np.ndarray:
        items = [p.payload for p in batch]
        return self.embedder.run_decoder(items, self.embedder.encode_visuals(items))


class _media:
    """Resolve an item's ``image``/``video``: ``data:`` URIs to bytes (videos to a temporary
    file, removed on exit), file paths only under ``allow``; remote URLs refused."""

    def __init__(self, item: dict[str, Any], index: int, allow: Path | None,
                 param: str = "input") -> None:
        self.item, self.index, self.allow = item, index, allow
        self.param = param
        self.temp: list[str] = []

    def __enter__(self) -> dict[str, Any]:
        out = dict(self.item)
        for key in ("image", "video"):
            value = out.get(key)
            if value is None:
                continue
            where = (f"{self.param}[{self.index}].{key}" if self.index >= 0
                     else f"{self.param}.{key}")
            if value.startswith("data:"):
                data, suffix = _decode_data_uri(value, where)
                if key == "image":
                    out[key] = data
                else:
                    handle, path = tempfile.mkstemp(suffix=suffix, prefix="qwen3emb-")
                    with os.fdopen(handle, "wb") as f:
                        f.write(data)
                    self.temp.append(path)
                    out[key] = path
            elif "://" in value:
                raise ApiError(400, f"{where} is a URL; this server does not fetch on a "
                               "client's behalf: send the file as a data: URI", param=where,
                               code="remote_url_refused")
            else:
                out[key] = os.fspath(_allowed_path(value, self.allow, where))
        return out

    def __exit__(self, *exc: object) -> None:
        for path in self.temp:
            Path(path).unlink(missing_ok=True)


def _decode_data_uri(uri: str, where: str) -> tuple[bytes, str]:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"{where} must be a base64 data: URI (data:image/png;base64,...)",
                       param=where, code="invalid_input")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where} is not valid base64", param=where,
                       code="invalid_input") from None
    subtype = header[5:-7].partition("/")[2].split(";")[0]
    return data, "." + (subtype or "bin")


def _allowed_path(value: str, allow: Path | None, where: str) -> Path:
    if allow is None:
        raise ApiError(400, f"{where} names a file, and this server takes none; send a data: "
                       "URI (or start it with --allow-files DIR)", param=where,
                       code="file_refused")
    root = Path(allow).resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise ApiError(400, f"{where} is outside the allowed directory; name a file under it",
                       param=where, code="file_refused")
    return path


def load_backend(settings: ServeSettings) -> Backend:
    """Open the bundle with the embedder (or reranker) its family, task and precision need.

    Raises:
        BundleError, InputError, ProviderError, MissingDependencyError: from the runtime.
    """
    manifest = read_manifest(settings.bundle)
    if manifest.task == "rerank":
        from qwen3emb.serve.rerank_backend import load_reranker

        return load_reranker(settings, manifest)
    providers = list(settings.providers) or None
    if "vision" in manifest.data:
        from qwen3emb.runtime import VLEmbedder

        vl_precision = settings.precision or "fp32"
        if vl_precision in manifest.models("gguf"):
            raise InputError(f"serving Qwen3-VL GGUF ({vl_precision}) is not supported",
                             hint="Choose an ONNX --precision of the bundle")
        vl = VLEmbedder(settings.bundle, providers, precision=vl_precision,
                        threads=settings.threads, max_tokens=settings.max_tokens,
                        spinning=False)
        return VLBackend(vl, manifest, settings, vl_precision)
    gguf_models = manifest.models("gguf")
    precision = settings.precision
    if manifest.runs_on_llama_cpp(precision, providers):
        from qwen3emb.runtime import GGUFTextEmbedder

        gguf = GGUFTextEmbedder(settings.bundle, gguf_type=precision,
                                n_threads=settings.threads, max_length=settings.max_tokens)
        chosen = next(k for k, v in gguf_models.items()
                      if manifest.root / v["path"] == gguf.path)
        return GGUFTextBackend(gguf, manifest, settings, chosen)
    from qwen3emb.runtime import TextEmbedder

    precision = precision or "fp32"
    # No spin-waiting: the event loop shares the cores with inference.
    embedder = TextEmbedder(settings.bundle, providers, precision=precision,
                            threads=settings.threads, max_length=settings.max_tokens,
                            spinning=False)
    return TextBackend(embedder, manifest, settings, precision)
