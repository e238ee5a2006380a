"""Parity of every artifact in a bundle against the HuggingFace reference.

One driver for every family: it checks the bundle and the request, then runs the suite of
the bundle's modality (:mod:`qwen3emb.validate.text`, :mod:`qwen3emb.validate.vl`) and
assembles the report.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from qwen3emb import __version__
from qwen3emb.errors import BundleError, InputError
from qwen3emb.manifest import read_manifest
from qwen3emb.validate.compare import ParityReport
from qwen3emb.validate.retrieval import EvalRequest

logger = logging.getLogger(__name__)


def _suites() -> dict[str, Any]:
    from qwen3emb.validate.text import TextSuite
    from qwen3emb.validate.vl import VLSuite

    return {"text": TextSuite, "vision-language": VLSuite}


def validate_bundle(
    bundle: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    *,
    texts: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    probe_max_length: int | None = None,
    model: Any = None,
    providers: Sequence[str] | None = None,
    reference_dtype: str = "auto",
    progress: bool = False,
    eval_set: EvalRequest | str | os.PathLike[str] | None = None,
    long_probes: Sequence[int] | None = None,
) -> ParityReport:
    """Compare every model (ONNX and GGUF) in ``bundle`` with the reference from transformers.

    Args:
        bundle: a bundle directory.
        reference: the checkpoint (local directory or hub id) the bundle was exported from.
        texts: extra probe texts, added to the built-in probe set (text bundles).
        precisions: only these precisions (default: all in the bundle).
        probe_max_length: truncation length for text probes (default: min(256, max_length)).
        model: an already loaded fp32 backbone of ``reference`` (saves a second load).
        providers: onnxruntime providers for the artifacts.
        reference_dtype: ``"float32"``, ``"bfloat16"``, or ``"auto"``: fp32 when it fits in
            half the available memory, else bf16 (the report says which was used; text).
        progress: a bar over the artifacts on stderr.
        eval_set: a BEIR-format directory (or an :class:`EvalRequest` naming split, task,
            truncation and gate): nDCG@10 and recall@10 of the reference and of every
            artifact go in ``report.retrieval`` (text bundles only; reranker bundles rerank
            the request's ``candidates`` run, or the whole corpus of a small set).
        long_probes: token lengths of the long-document probes, each capped at the bundle's
            max_length (default 2048, 8192, 32768; ``()`` for none; text bundles).

    Returns:
        The report; ``report.passed`` says whether every artifact met its floor (and, when
        the eval set has a ``max_drop``, its retrieval gate).

    Raises:
        BundleError / CheckpointError / InputError: unusable inputs (not a parity failure).
    """
    from qwen3emb.convert import load_checkpoint

    start = time.perf_counter()
    manifest = read_manifest(bundle)
    if problems := manifest.verify():
        raise BundleError(f"bundle '{bundle}' fails its hash check: {'; '.join(problems)}",
                          hint="Re-run the export")
    modality = str(manifest.data.get("modality", "text"))
    suites = _suites()
    if manifest.task == "rerank":
        from qwen3emb.validate.rerank import RerankSuite
        from qwen3emb.validate.vl_rerank import VLRerankSuite

        suites = {"text": RerankSuite, "vision-language": VLRerankSuite}
    if modality not in suites:
        raise BundleError(f"bundle '{bundle}' holds a '{modality}' model, which this version "
                          "cannot validate", hint=f"Validators exist for: {', '.join(suites)}")
    request, beir = _eval_set(eval_set, suites[modality], modality, manifest.max_length,
                              manifest.task)
    checkpoint = load_checkpoint(reference)
    extra = {} if long_probes is None else {"long_lengths": tuple(long_probes)}
    suite = suites[modality](bundle, manifest, checkpoint, texts=texts,
                             probe_max_length=probe_max_length, model=model,
                             providers=providers, reference_dtype=reference_dtype, **extra)
    held = suite.held_precisions()
    if not held:
        raise InputError(f"bundle '{bundle}' has no model to validate", hint="Re-run the export")
    if precisions and (unknown := sorted(set(precisions) - set(held))):
        raise InputError(f"bundle has no model of precision {unknown}",
                         hint=f"Available: {', '.join(held)}")
    results = suite.run(precisions, progress)
    retrieval = None
    if request is not None and beir is not None:
        if manifest.task == "rerank":
            from qwen3emb.validate.rerank_retrieval import evaluate_reranker_bundle as evaluate
        else:
            from qwen3emb.validate.retrieval import evaluate_text_bundle as evaluate

        retrieval = evaluate(suite, beir, request, precisions, progress)
    import transformers

    return ParityReport(
        bundle=str(bundle),
        reference={"source": str(reference), "implementation": suite.implementation,
                   "precision": suite.precision, "transformers": transformers.__version__},
        probe_max_length=suite.probe_max_length,
        probe_count=suite.probe_count,
        artifacts=results,
        tool_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - start,
        retrieval=retrieval,
    )


def _eval_set(eval_set: Any, suite: Any, modality: str, max_length: int, task: str
              ) -> tuple[Any, Any]:
    """The request and the loaded set, checked before any model is loaded."""
    if eval_set is None:
        return None, None
    from qwen3emb.errors import require
    from qwen3emb.validate.eval_set import load_eval_set

    if not getattr(suite, "supports_eval_set", False):
        raise InputError(f"retrieval sets (--eval-set) are scored on text bundles only; this "
                         f"bundle is {modality}",
                         hint="Validate it without --eval-set (see docs/eval-set.md)")
    require("ir_measures", "eval")
    request = eval_set if isinstance(eval_set, EvalRequest) else EvalRequest(eval_set)
    if request.candidates is not None and task != "rerank":
        raise InputError("--candidates names a first stage's run for a reranker to rerank; "
                         "this bundle is an embedder", hint="Drop --candidates (an embedder "
                         "ranks the whole corpus itself)")
    if request.max_length is not None and request.max_length > max_length:
        raise InputError(f"eval max length {request.max_length} exceeds the bundle's "
                         f"max_length {max_length}", hint=f"Choose at most {max_length}")
    beir = load_eval_set(request.path, request.split)
    if task == "rerank":
        from qwen3emb.validate.rerank_retrieval import candidates_for

        candidates_for(request, beir)  # a bad run file fails before any model loads
    return request, beir


__all__ = ["EvalRequest", "ParityReport", "validate_bundle"]
