"""Parity of a text bundle: the built-in probes through every ONNX and GGUF model, against
transformers' ``AutoModel`` with the model-card recipe."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3emb.constants import DEFAULT_TASK, FLOORS
from qwen3emb.errors import InputError, Qwen3EmbError
from qwen3emb.progress import bar
from qwen3emb.validate.compare import ArtifactResult, top1_agreement
from qwen3emb.validate.probes import (
    LONG_PROBE_LENGTHS,
    ProbeSet,
    build_probes,
    long_probe_lengths,
    long_probe_text,
)
from qwen3emb.validate.reference import ReferenceEmbedder, reference_query
from qwen3emb.validate.runners import checked_on, engine_label, engines, open_runner

logger = logging.getLogger(__name__)

PROBE_MAX_LENGTH = 256
"""Probes truncate here (or at the bundle's max_length if smaller); long inputs have probes
of their own (``long_lengths``), each embedded once per artifact."""

PADDING_PROBES = 6


def _floor_order(precision: str) -> int:
    order = list(FLOORS)
    return order.index(precision) if precision in order else len(order)


def check_artifact(runner: Any, ref: ReferenceEmbedder, probes: ProbeSet, result: ArtifactResult,
                   max_length: int, out_dim: int, full_dim: int, mrl_min: int) -> None:
    """Run every probe through ``runner`` (a TextEmbedder-like object) and record the results."""
    ref_dims = None if out_dim == full_dim else out_dim
    names = probes.names
    texts = [t for _, t in probes.texts]
    reference = ref.embed(texts, max_length, ref_dims)

    batched = runner.encode(texts, batch_size=8)
    result.add("probe", names, batched, reference)

    # Padding sides, fed straight to the graph in one mixed-length batch.
    picked = list(range(min(PADDING_PROBES, len(texts))))
    if hasattr(runner, "pad"):
        ids = runner.tokenize([texts[i] for i in picked])
        for side in ("left", "right"):
            out = runner.run_ids(*runner.pad(ids, side))
            result.add(f"padding-{side}", [names[i] for i in picked], out, reference[picked])

    # Batch-vs-single invariance: each probe alone must give what the batch gave.
    singles = np.concatenate([runner.encode([texts[i]]) for i in picked])
    result.add("single", [names[i] for i in picked], singles, reference[picked])
    result.batch_vs_single_max_diff = float(np.abs(singles - batched[picked]).max())

    # Queries with the instruction, documents without; retrieval agreement.
    task = probes.task or DEFAULT_TASK
    queries = [q for q, _ in probes.pairs]
    docs = [d for _, d in probes.pairs]
    q_out = runner.encode_queries(queries, task=probes.task)
    d_out = runner.encode_documents(docs)
    q_ref = ref.embed([reference_query(task, q) for q in queries], max_length, ref_dims)
    d_ref = ref.embed(docs, max_length, ref_dims)
    result.add("query", [str(i) for i in range(len(queries))], q_out, q_ref)
    result.add("document", [str(i) for i in range(len(docs))], d_out, d_ref)
    result.retrieval_top1_agreement = top1_agreement(q_out, d_out, q_ref, d_ref)

    # Matryoshka cuts (only when the graph emits the full width).
    if out_dim == full_dim:
        for width in sorted({mrl_min, max(mrl_min, full_dim // 2)}):
            out = runner.encode([texts[i] for i in picked], dimensions=width)
            ref_cut = ref.embed([texts[i] for i in picked], max_length, width)
            result.add(f"mrl-{width}", [names[i] for i in picked], out, ref_cut)

    # Long documents, each alone at its length (the runner is not bound to max_length here).
    for length in probes.long_lengths:
        text = long_probe_text(length)
        ids = ref.token_ids(text, length)
        embed = runner.encode_tokens if hasattr(runner, "encode_tokens") else runner.embed_ids
        out = embed([ids])[:, :out_dim]
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        result.add("long", [str(len(ids))], out, ref.embed([text], length, ref_dims))


class TextSuite:
    """The text probes through every model of a text bundle.

    Args:
        bundle: the bundle directory; manifest: its manifest; checkpoint: the reference.
        texts: extra probe texts, added to the built-in probe set.
        probe_max_length: truncation length for probes (default: min(256, max_length)).
        model: an already loaded fp32 backbone of the reference.
        providers: onnxruntime providers for the artifacts.
        reference_dtype: ``"float32"``, ``"layerwise"`` (fp32, one decoder layer resident at
            a time), ``"bfloat16"`` or ``"auto"`` (see :func:`choose_reference_dtype`).
        long_lengths: token lengths of the long-document probes, each capped at the bundle's
            max_length (:func:`qwen3emb.validate.probes.long_probe_lengths`); ``()`` for none.

    Raises:
        InputError: a probe length outside 8..max_length.
    """

    implementation = "transformers AutoModel"
    supports_eval_set = True
    """BEIR retrieval sets can be scored (:mod:`qwen3emb.validate.retrieval`)."""

    def __init__(self, bundle: Any, manifest: Any, checkpoint: Any, *,
                 texts: Sequence[str] | None = None, probe_max_length: int | None = None,
                 model: Any = None, providers: Any = None, reference_dtype: str = "auto",
                 long_lengths: Sequence[int] = LONG_PROBE_LENGTHS) -> None:
        self.bundle, self.manifest, self.checkpoint = bundle, manifest, checkpoint
        self.model, self.providers = model, providers
        self.reference: ReferenceEmbedder | None = None
        self.limit = probe_max_length or min(PROBE_MAX_LENGTH, manifest.max_length)
        if not 8 <= self.limit <= manifest.max_length:
            raise InputError(f"probe max length {self.limit} is outside "
                             f"8..{manifest.max_length}")
        self.probe_max_length = self.limit
        self.probes = build_probes(self.limit, list(texts or []), long_probe_lengths(
            manifest.max_length, long_lengths, shortest=self.limit))
        self.probe_count = (len(self.probes.texts) + 2 * len(self.probes.pairs)
                            + len(self.probes.long_lengths))
        self.dtype = reference_dtype if reference_dtype != "auto" else \
            choose_reference_dtype(checkpoint)
        self.precision = self.dtype

    def _models(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [(kind, precision, entry) for kind in ("onnx", "gguf")
                for precision, entry in sorted(self.manifest.models(kind).items(),
                                               key=lambda kv: _floor_order(kv[0]))]

    def held_precisions(self) -> list[str]:
        return [m[1] for m in self._models()]

    def artifacts(self, precisions: Sequence[str] | None = None
                  ) -> list[tuple[str, str, dict[str, Any]]]:
        """(kind, precision, manifest entry) of each model to check, floors' order."""
        return [m for m in self._models() if not precisions or m[1] in precisions]

    def run(self, precisions: Sequence[str] | None, progress: bool = False
            ) -> list[ArtifactResult]:
        manifest = self.manifest
        ref: Any
        if self.dtype == "layerwise":
            from qwen3emb.validate.layerwise import LayerwiseReference

            ref = LayerwiseReference(self.checkpoint.path)
        else:
            ref = ReferenceEmbedder(self.checkpoint.path, model=self.model, dtype=self.dtype)
        self.precision = ref.precision
        if ref.hidden_size != manifest.dim:
            raise InputError(
                f"reference hidden size {ref.hidden_size} != bundle dim {manifest.dim}",
                hint="Pass the checkpoint the bundle was exported from")
        task = self.probes.task or DEFAULT_TASK
        ref.prefetch([*(t for _, t in self.probes.texts),
                      *(reference_query(task, q) for q, _ in self.probes.pairs),
                      *(d for _, d in self.probes.pairs)], self.limit)
        self.reference = ref
        models = self.artifacts(precisions)
        results: list[ArtifactResult] = []
        with bar(len(models), "validate", progress, unit="artifact") as ticker:
            for kind, precision, entry in models:
                for engine in engines(self.providers) if kind == "onnx" else [None]:
                    results.append(_check_one(self.bundle, kind, precision, entry, ref,
                                              self.probes, self.limit, engine, manifest))
                ticker.update(1)
        return results


def _check_one(bundle: Any, kind: str, precision: str, entry: dict[str, Any],
               ref: ReferenceEmbedder, probes: ProbeSet, limit: int, providers: Any,
               manifest: Any) -> ArtifactResult:
    """Validate one artifact; an artifact that cannot even run is recorded as failed."""
    result = ArtifactResult(artifact=entry["path"], kind=kind, precision=precision,
                            floor=FLOORS.get(precision, FLOORS["int4"]),
                            engine=engine_label(providers))
    try:
        runner, out_dim = open_runner(bundle, kind, precision, limit, providers, manifest)
        result.checked_on = checked_on(runner, kind, precision)
        check_artifact(runner, ref, probes, result, limit, out_dim, manifest.dim,
                       manifest.mrl_min)
    except Qwen3EmbError as e:
        result.error = e.one_line()
    logger.info("%s: min cosine %.6f (floor %s)", entry["path"], result.min_cosine,
                result.floor)
    return result


def choose_reference_dtype(checkpoint: Any) -> str:
    """fp32 when the model fits in half the available memory (the artifacts need the rest),
    else fp32 layer by layer (:mod:`qwen3emb.validate.layerwise`): an 8B reference is 32 GB
    in fp32, one of its layers under 1 GB."""
    stored = sum(f.stat().st_size for f in checkpoint.weight_files)
    fp32_bytes = stored * (2 if checkpoint.config.get("torch_dtype", checkpoint.config.get(
        "dtype")) in ("bfloat16", "float16") else 1)
    available = _available_memory()
    if available is None or fp32_bytes <= available / 2:
        return "float32"
    logger.warning("reference runs layer by layer (fp32): the whole model needs %.1f GB, "
                   "%.1f GB available", fp32_bytes / 1e9, available / 1e9)
    return "layerwise"


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
