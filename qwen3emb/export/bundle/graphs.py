"""A family's ONNX graphs in a staged bundle: traced (streamed when the family allows it),
then written in every requested precision, the embedding graph calibrated on its own inputs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import ATTENTION_MASK, INPUT_IDS, ONNX_DIR, PIXEL_PATCHES, VISUAL_EMBEDS
from qwen3emb.convert import Family
from qwen3emb.errors import OutputError

logger = logging.getLogger(__name__)


def write_graphs(family: Family, stage: Path, specs: Sequence[Any], manifest: dict[str, Any], *,
                 dimensions: int | None, precisions: Sequence[str], int8_scheme: str | None,
                 keep_backbone: bool, progress: bool = False,
                 targets: dict[str, float] | None = None
                 ) -> tuple[Any, list[dict[str, Any]]]:
    """Trace each graph of ``specs`` into ``stage/onnx/<name>.onnx`` and build its precisions.

    Args:
        family: the checkpoint's family.
        stage: the staged bundle (tokenizer and support files already copied).
        specs: :meth:`Family.graph_specs`, the embedding graph last.
        manifest: the manifest as far as it is written (for calibration through the runtime).
        dimensions: Matryoshka width baked into the embedding graph.
        precisions: ONNX precisions (fp32 first).
        int8_scheme: the int8 recipe the user forced, or ``None``: then each graph is built
            as :meth:`Family.graph_quantization` says (searched or the family's recipe).
        keep_backbone: return the fp32 backbone if one was loaded (for the validator).
        progress: progress bars.
        targets: the searched precisions' calibration targets (every graph aims for them).

    Returns:
        The loaded fp32 backbone (or ``None``) and the manifest entries, the embedding
        graph's first.
    """
    from qwen3emb.export.quant.precisions import build_precisions

    paths = _trace(family, stage / ONNX_DIR, specs, dimensions, progress)
    backbone = paths.pop("backbone", None)
    entries: list[dict[str, Any]] = []
    for spec in specs:
        scheme, search = family.graph_quantization(spec.name, int8_scheme)
        built = build_precisions(
            stage, paths[spec.name], spec, family.graph_precisions(spec.name, list(precisions)),
            int8_scheme=scheme, entry=family.graph_entry(spec.name),
            calibration=partial(calibration_feeds, spec, stage, manifest, list(entries)),
            progress=progress, search=search, targets=targets)
        entries = built + entries
    family.pair_entries(entries)
    if any(getattr(s, "metric", None) == "score" and VISUAL_EMBEDS in s.input_names
           for s in specs):
        from qwen3emb.export.quant.vl_calibration import pair_vision_by_score

        pair_vision_by_score(stage, manifest, entries)
    return (backbone if keep_backbone else None), entries


def _trace(family: Family, onnx_dir: Path, specs: Sequence[Any], dimensions: int | None,
           progress: bool) -> dict[str, Any]:
    if family.streamable:
        from qwen3emb.export.onnx.trace import export_onnx

        return {spec.name: export_onnx(family, onnx_dir / f"{spec.name}.onnx", spec,
                                       dimensions=dimensions, progress=progress)
                for spec in specs}
    from qwen3emb.export.onnx.eager import export_module

    backbone = family.load_backbone()
    logger.info("tracing %s graphs from the loaded model (dynamo, opset %d)",
                ", ".join(s.name for s in specs), specs[0].opset)
    out: dict[str, Any] = {"backbone": backbone}
    for spec in specs:
        example, dynamic = family.trace_inputs(spec.name, spec)
        out[spec.name] = export_module(family.graph_module(backbone, spec.name, dimensions),
                                       example, dynamic, spec, onnx_dir / f"{spec.name}.onnx")
    return out


def calibration_feeds(spec: Any, stage: Path, manifest: dict[str, Any],
                      entries: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Calibration inputs of a graph, chosen by what the graph takes: a reranker's pairs in its
    prompt; token ids alone come from the staged tokenizer; image patches from the bundle's
    own host preprocessing of synthetic images; visual embeddings from that preprocessing and
    the bundle's fp32 vision graph (already written, in ``entries``).

    Raises:
        OutputError: a graph whose inputs no calibration source produces.
    """
    names = spec.input_names
    if getattr(spec, "metric", None) == "score" and VISUAL_EMBEDS in names:
        from qwen3emb.export.quant.vl_calibration import vl_rerank_calibration_feeds
        from qwen3emb.manifest import Manifest

        vision = next((e for e in entries if e.get("graph") == "vision"
                       and e.get("precision") == "fp32"), None)
        if vision is not None:
            staged = Manifest(root=stage, data={**manifest, "artifacts": entries})
            return vl_rerank_calibration_feeds(staged, vision)
    elif getattr(spec, "metric", None) == "score":
        from qwen3emb.export.quant.precisions import rerank_calibration_feeds
        from qwen3emb.manifest import Manifest

        return rerank_calibration_feeds(Manifest(root=stage, data=dict(manifest)))
    if names == [INPUT_IDS, ATTENTION_MASK]:
        from qwen3emb.export.quant.precisions import calibration_feeds as text_feeds

        return text_feeds(stage / "tokenizer.json")
    if PIXEL_PATCHES in names:
        from qwen3emb.export.quant.vl_calibration import vision_calibration_feeds
        from qwen3emb.manifest import Manifest

        return vision_calibration_feeds(Manifest(root=stage, data=dict(manifest)))
    if VISUAL_EMBEDS in names:
        from qwen3emb.export.quant.vl_calibration import vl_calibration_feeds
        from qwen3emb.manifest import Manifest

        vision = next((e for e in entries if e.get("graph") == "vision"
                       and e.get("precision") == "fp32"), None)
        if vision is not None:
            staged = Manifest(root=stage, data={**manifest, "artifacts": entries})
            return vl_calibration_feeds(staged, vision)
    raise OutputError(f"no calibration inputs for the {spec.name} graph (inputs {names})",
                      hint="Choose fp32/fp16 for this model, or an int8 scheme without "
                           "calibration (--int8-scheme nbits8)")
