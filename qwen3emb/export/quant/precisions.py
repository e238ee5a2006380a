"""Write every requested precision of a bundle's ONNX graphs: fp32 (reference), fp16, int8, int4."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import ATTENTION_MASK, EXTERNAL_DATA_SUFFIX, FLOORS, INPUT_IDS
from qwen3emb.errors import InputError
from qwen3emb.export.quant import quantize as q
from qwen3emb.manifest import file_entry

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
CALIBRATION_TEXTS = 32
"""Texts of the built-in corpus used to find outlier channels (a few hundred tokens)."""
LONG_CALIBRATION_TOKENS = 512
"""Length of the one long calibration feed (the calibration texts joined)."""


def check_precisions(precisions: Iterable[str] | None, int8_scheme: str | None = None
                     ) -> list[str]:
    """Normalize the requested precisions: fp32 always first, no repeats, in a fixed order.

    Raises:
        InputError: an unknown precision or int8 scheme, listing the supported values.
    """
    wanted = set(precisions or ())
    unknown = sorted(wanted - set(PRECISIONS))
    if unknown:
        raise InputError(f"unknown precision {', '.join(repr(p) for p in unknown)}",
                         hint=f"Supported: {', '.join(PRECISIONS)}")
    if int8_scheme is not None:
        q.check_int8_scheme(int8_scheme)
    return [p for p in PRECISIONS if p == "fp32" or p in wanted]


SEARCHED = ("int8", "int4")
"""Precisions the accuracy-driven search builds (and ``--target`` can aim)."""


def check_targets(targets: Iterable[str] | None, precisions: Sequence[str],
                  int8_scheme: str | None = None) -> dict[str, float]:
    """Parse ``PRECISION=COSINE`` calibration targets for the search (``int8=0.9994``).

    A target replaces the search's default aim (:data:`scoring.TARGETS`) for that precision:
    the search escalates until the minimum cosine on the calibration texts reaches it or the
    size budget stops it. It must lie between the precision's floor and 1.

    Raises:
        InputError: a malformed entry, a precision that is not searched or not requested, a
            value outside ``[floor, 1)``, or a target beside a forced ``--int8-scheme``.
    """
    out: dict[str, float] = {}
    for item in targets or ():
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        try:
            cosine = float(value) if sep else math.nan
        except ValueError:
            cosine = math.nan
        if name not in SEARCHED or math.isnan(cosine):
            raise InputError(f"--target {item!r} is not PRECISION=COSINE for int8 or int4",
                             hint="Write e.g. --target int8=0.9994 --target int4=0.97")
        if name not in precisions:
            raise InputError(f"--target {item!r} aims a precision that is not exported",
                             hint=f"Add --precision {name}, or drop the target")
        if not FLOORS[name] <= cosine < 1.0:
            raise InputError(f"--target {item!r} is outside [{FLOORS[name]}, 1)",
                             hint=f"The {name} floor is {FLOORS[name]}; 1 only fp32 reaches")
        out[name] = cosine
    if out and int8_scheme is not None:
        raise InputError("--target aims the accuracy search, which --int8-scheme turns off",
                         hint="Drop --int8-scheme (a fixed recipe) or drop --target")
    return out


def calibration_feeds(tokenizer_json: Path, texts: Sequence[str] | None = None
                      ) -> list[dict[str, np.ndarray]]:
    """One unpadded feed per calibration text, tokenized with the bundle's tokenizer."""
    from tokenizers import Tokenizer

    from qwen3emb.convert._corpus import CORPUS

    tokenizer = Tokenizer.from_file(os.fspath(tokenizer_json))
    tokenizer.enable_truncation(max_length=128)
    chosen = list(texts or CORPUS)[:CALIBRATION_TEXTS]
    feeds = []
    for text in chosen:
        ids = np.asarray([tokenizer.encode(text).ids], dtype=np.int64)
        feeds.append({INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids)})
    # One long text as well (the texts joined): ranges and scores must cover long inputs.
    tokenizer.enable_truncation(max_length=LONG_CALIBRATION_TOKENS)
    ids = np.asarray([tokenizer.encode(" ".join(chosen * 4)).ids], dtype=np.int64)
    feeds.append({INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids)})
    return feeds


def rerank_calibration_feeds(manifest: Any) -> list[dict[str, np.ndarray]]:
    """One unpadded feed per calibration pair, in the reranker's own prompt: the built-in
    corpus's texts as documents, the opening words of other texts as queries, plus one long
    document (the texts joined). Independent of the validator's reranker probes.

    Args:
        manifest: the staged bundle's :class:`qwen3emb.manifest.Manifest`.
    """
    from qwen3emb.convert._corpus import CORPUS
    from qwen3emb.runtime.rerank import RerankPrompt

    texts = list(CORPUS)[:CALIBRATION_TEXTS]
    prompt = RerankPrompt.from_manifest(manifest, min(manifest.max_length, 1024))
    queries = [" ".join(texts[(i + 7) % len(texts)].split()[:6]) for i in range(len(texts))]
    rows = [prompt.pair_ids(q, [d])[0][0] for q, d in zip(queries, texts)]
    rows += prompt.pair_ids(queries[0], [" ".join(texts * 4)])[0]
    feeds = []
    for ids in rows:
        array = np.asarray([ids], dtype=np.int64)
        feeds.append({INPUT_IDS: array, ATTENTION_MASK: np.ones_like(array)})
    return feeds


FP32_SCHEME = "fp32 weights and activations"
FUSED_SCHEME = "; RMSNorm and residual Adds fused"


def build_precisions(stage: Path, raw_path: Path, spec: Any, precisions: Sequence[str],
                     *, int8_scheme: str = q.DEFAULT_INT8_SCHEME,
                     tokenizer_json: Path | None = None,
                     calibration: Callable[[], Sequence[dict[str, np.ndarray]]] | None = None,
                     entry: dict[str, Any] | None = None,
                     progress: bool = False, search: bool = False,
                     targets: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Optimize an exported fp32 graph and write each requested precision beside it.

    Generic over graphs: the text model (``model.onnx``), a Qwen3-VL decoder (``decoder.onnx``)
    or vision tower (``vision.onnx``). Variants are named after the fp32 file's stem
    (``model_fp16.onnx``, ``decoder_int8.onnx``, ``vision_fp16.onnx``).

    Only the graph is rewritten in memory; weights are read one tensor at a time, both for
    calibration (:mod:`qwen3emb.export.quant.calibrate`) and for the variants
    (:mod:`qwen3emb.export.quant.variants`), so memory stays flat for any model size.

    Args:
        stage: the staged bundle directory.
        raw_path: the exporter's fp32 graph (replaced by its optimized form).
        spec: the graph contract every variant must keep (``TextGraphSpec`` or ``GraphSpec``).
        precisions: from :func:`check_precisions`.
        int8_scheme: one of ``quantize.INT8_SCHEMES``.
        tokenizer_json: the checkpoint tokenizer, for calibration texts (text models).
        calibration: returns the graph's calibration feeds (any inputs of the graph); called
            only when a requested variant needs activation ranges (int4, int8 other than
            nbits8; default: :func:`calibration_feeds` of ``tokenizer_json``).
        entry: extra manifest keys of each model entry (default ``{"role": "model"}``).
        progress: bars for calibration and for writing each variant.
        search: build int8 / int4 by the accuracy-driven search
            (:mod:`qwen3emb.export.quant.search`), starting from ``int8_scheme``; without it
            ``int8_scheme`` and the int4 recipe are applied as they are.
        targets: calibration min cosine the search aims for, per precision (from
            :func:`check_targets`; default :data:`scoring.TARGETS`).

    Returns:
        Manifest artifact entries (models and their external data files), fp32 first.

    Raises:
        InputError: int8/int4 asked for with neither ``calibration`` nor ``tokenizer_json``.
        OutputError: a graph breaks the contract.
    """
    import onnx

    from qwen3emb.export.onnx.contract import check_graph_contract
    from qwen3emb.export.onnx.optimize import optimize_graph
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.variants import build_variants

    keys = {"role": "model", **(entry or {})}
    data_path = raw_path.with_name(raw_path.name + EXTERNAL_DATA_SUFFIX)
    # The rewrite needs the graph, not the weights: external weights stay on disk.
    model = onnx.load(os.fspath(raw_path), load_external_data=False)
    stats = optimize_graph(model)
    onnx.save_model(model, os.fspath(raw_path))
    del model
    check_graph_contract(raw_path, spec, schema_check=False)
    fp32_scheme = FP32_SCHEME + (FUSED_SCHEME if stats.rms_norms else "")
    entries = [file_entry(stage, raw_path, kind="onnx", precision="fp32", scheme=fp32_scheme,
                          settings={"fusions": stats.to_dict()}, **keys)]
    if data_path.exists():
        entries.append(file_entry(stage, data_path, kind="onnx", role="external-data",
                                  precision="fp32"))
    wanted = [p for p in precisions if p != "fp32"]
    ranges = None
    # Weight-only schemes (nbits8) need no activation ranges.
    searched = [p for p in wanted if search and p in ("int8", "int4")]
    samples = None
    if searched:
        from qwen3emb.export.quant.sensitivity import ActivationSamples

        samples = ActivationSamples()
    if searched or "int4" in wanted or ("int8" in wanted
                                        and int8_scheme in q.CALIBRATED_INT8_SCHEMES):
        if calibration is not None:
            feeds = calibration()
        elif tokenizer_json is not None:
            feeds = calibration_feeds(tokenizer_json)
        else:
            raise InputError(f"{raw_path.name}: int8/int4 need calibration inputs",
                             hint="Pass tokenizer_json (text models) or a calibration callable")
        ranges = calibrate(raw_path, feeds, progress=progress,
                           observe=samples.observe if samples is not None else None)
    fixed = build_variants(raw_path, [p for p in wanted if p not in searched],
                           calibration=ranges, int8_scheme=int8_scheme, progress=progress)
    if searched:
        from qwen3emb.export.quant.search import search_variants

        # searched precisions are int8/int4, which always calibrate (above)
        assert ranges is not None and samples is not None
        from qwen3emb.export.quant.scoring import Metric

        fixed += search_variants(raw_path, searched, scheme=int8_scheme, calibration=ranges,
                                 metric=Metric(getattr(spec, "metric", "cosine")),
                                 samples=samples, feeds=feeds, targets=targets)
    order = {p: i for i, p in enumerate(wanted)}
    speeds: dict[Path, dict[str, Any]] = {}
    if ranges is not None:
        from qwen3emb.export.quant.scoring import scoring_feeds
        from qwen3emb.export.quant.speed import measure_speed

        speeds = measure_speed(raw_path, [v.path for v in fixed], scoring_feeds(feeds))
    for variant in sorted(fixed, key=lambda v: order[v.precision]):
        check_graph_contract(variant.path, spec, schema_check=False)
        settings = {**variant.settings, **({"speed": speeds[variant.path]}
                                           if variant.path in speeds else {})}
        entries.append(file_entry(stage, variant.path, kind="onnx", precision=variant.precision,
                                  scheme=variant.scheme, settings=settings, **keys))
        for extra in variant.files[1:]:
            entries.append(file_entry(stage, extra, kind="onnx", role="external-data",
                                      precision=variant.precision))
    return entries
