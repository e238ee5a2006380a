"""Parity of a Qwen3-VL bundle's ONNX graphs, every precision side by side.

Each decoder precision is checked as the runtime runs it: host preprocessing, the vision graph
it is paired with (``vision_precision`` in its manifest entry), then the decoder, on every probe
alone, all probes in one mixed batch, and a Matryoshka cut. Each vision precision is also
checked alone (visual embeddings and deepstack maps vs the HF vision tower on the same patches).
Every artifact is gated by the floor of its own precision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3emb.constants import FLOORS
from qwen3emb.errors import Qwen3EmbError
from qwen3emb.validate.compare import ArtifactResult
from qwen3emb.validate.runners import checked_on, engine_label, engines

logger = logging.getLogger(__name__)


def _order(entry: dict[str, Any]) -> int:
    order = list(FLOORS)
    return order.index(entry["precision"]) if entry["precision"] in order else len(order)


def onnx_graphs(manifest: Any, precisions: Sequence[str] | None = None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The decoder and vision entries to check, fp32 first, limited to ``precisions``."""
    graphs = [a for a in manifest.artifacts if a.get("kind") == "onnx" and a.get("graph")]
    keep = (lambda a: a["precision"] in precisions) if precisions else (lambda a: True)
    decoders = sorted((a for a in graphs if a["graph"] == "decoder" and keep(a)), key=_order)
    visions = sorted((a for a in graphs if a["graph"] == "vision" and keep(a)), key=_order)
    return decoders, visions


def validate_vl_onnx(bundle: Any, manifest: Any, ref: Any, probes: list[Any], refs: np.ndarray,
                     providers: Any, precisions: Sequence[str] | None = None
                     ) -> list[ArtifactResult]:
    """One result per decoder precision (whole pipeline), then one per vision precision."""
    decoders, visions = onnx_graphs(manifest, precisions)
    results = [_check_pipeline(bundle, manifest, entry, probes, refs, engine)
               for entry in decoders for engine in engines(providers)]
    if visions:
        cases = _vision_cases(ref, probes)
        results += [_check_vision(manifest, entry, cases, engine)
                    for entry in visions for engine in engines(providers)]
    return results


def _check_pipeline(bundle: Any, manifest: Any, entry: dict[str, Any], probes: list[Any],
                    refs: np.ndarray, providers: Any) -> ArtifactResult:
    from qwen3emb.runtime.vl import VLEmbedder, choose_graphs

    precision = entry["precision"]
    result = ArtifactResult(artifact=entry["path"], kind="onnx", precision=precision,
                            floor=FLOORS.get(precision, FLOORS["int4"]),
                            engine=engine_label(providers))
    out_dim = int(manifest.embedding["output_dim"])
    try:
        vision = choose_graphs(manifest, precision)[1]
        result.note = f"whole pipeline, with {vision['path']}"
        runner = VLEmbedder(bundle, providers, precision=precision, verify=False, strict=False)
        result.checked_on = checked_on(runner, "onnx", precision)
        names = [f"{p.kind}:{p.name}" for p in probes]
        for i, probe in enumerate(probes):
            out = runner.encode([probe.item], instruction=probe.instruction)
            result.add("single", [names[i]], out, refs[i:i + 1])
        plain = [i for i, p in enumerate(probes) if p.instruction is None]
        batch = runner.encode([probes[i].item for i in plain], batch_size=len(plain))
        result.add("batch", [names[i] for i in plain], batch, refs[plain])
        if out_dim == manifest.dim:
            width = max(manifest.mrl_min, out_dim // 2)
            cut = runner.encode([probes[i].item for i in plain], dimensions=width)
            result.add(f"mrl-{width}", [names[i] for i in plain], cut,
                       cut_reference(refs[plain], width))
    except Qwen3EmbError as e:
        result.error = e.one_line()
    logger.info("%s: min cosine %.6f (floor %s)", result.name, result.min_cosine, result.floor)
    return result


def _vision_cases(ref: Any, probes: list[Any]) -> list[tuple[str, np.ndarray, list[int],
                                                              np.ndarray]]:
    """(probe name, patches [groups, h*w, C*T*P*P], grid, HF vision output) per probe with
    exactly one image or video."""
    cases = []
    for probe in probes:
        if len([k for k in ("video", "image") if probe.item.get(k) is not None]) != 1:
            continue
        inputs = ref.inputs(probe.item, probe.instruction)
        image = "pixel_values" in inputs
        pixels = inputs["pixel_values" if image else "pixel_values_videos"].numpy()
        grid = inputs["image_grid_thw" if image else "video_grid_thw"][0].tolist()
        groups = pixels.reshape(grid[0], grid[1] * grid[2], -1)
        cases.append((probe.name, groups, grid, ref.visual(inputs)))
    return cases


def _check_vision(manifest: Any, entry: dict[str, Any],
                  cases: list[tuple[str, np.ndarray, list[int], np.ndarray]],
                  providers: Any) -> ArtifactResult:
    from qwen3emb.runtime.vl import VLInputs

    precision = entry["precision"]
    result = ArtifactResult(artifact=entry["path"], kind="onnx", precision=precision,
                            floor=FLOORS.get(precision, FLOORS["int4"]),
                            note="vision graph alone: visual embeddings and deepstack maps vs "
                                 "the HF vision tower, same patches",
                            engine=engine_label(providers))
    try:
        runner = VLInputs(manifest, entry, providers)
        result.checked_on = checked_on(runner, "onnx", precision)
        for name, groups, grid, expected in cases:
            embeds, deepstack = runner.run_vision(groups, grid[1], grid[2])
            ours = np.concatenate([embeds.reshape(-1), deepstack.reshape(-1)])
            result.add("vision", [name], ours[None], expected[None])
    except Qwen3EmbError as e:
        result.error = e.one_line()
    logger.info("%s: min cosine %.6f (floor %s)", result.name, result.min_cosine, result.floor)
    return result


def cut_reference(vectors: np.ndarray, width: int) -> np.ndarray:
    """Matryoshka cut of reference vectors (the validator's own, not the runtime's)."""
    out = vectors[:, :width].astype(np.float32)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
