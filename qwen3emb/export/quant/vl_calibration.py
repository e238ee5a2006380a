"""Calibration inputs of the Qwen3-VL graphs: what the runtime feeds them, on text, images,
videos and mixtures (decoder), and on images and a video (vision tower).

int8 and int4 decoders are built from per-channel activation ranges (see
:mod:`qwen3emb.export.quant.quantize`). Visual tokens reach the decoder as the vision tower's
embeddings and deepstack maps, whose ranges differ from text token embeddings, so the
calibration set holds items of every kind, run through the bundle's own host preprocessing
and fp32 vision graph (:class:`qwen3emb.runtime.vl.VLInputs`). The images are synthetic
(gradients, stripes, noise; no downloads) and deliberately not the validator's probe images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwen3emb.manifest import Manifest

logger = logging.getLogger(__name__)

CALIBRATION_TEXTS = 12
"""Texts of the built-in corpus (several languages, code, numbers), alone or with visuals."""
CALIBRATION_INSTRUCTION = "Retrieve images or text relevant to the user's query."


def calibration_images() -> list[Any]:
    """Synthetic images of several sizes and modes (none of the validator's probe images)."""
    from qwen3emb.convert._corpus import synthetic_image

    return [synthetic_image(w, h, mode=mode, seed=seed) for w, h, mode, seed in (
        (256, 192, "RGB", 31), (64, 64, "RGB", 32), (900, 120, "RGB", 33),
        (140, 300, "RGB", 34), (160, 160, "L", 35), (480, 360, "RGB", 36))]


def calibration_frames() -> list[Any]:
    """A 6-frame synthetic video (a frame list, as if sampled at 1 fps)."""
    from qwen3emb.convert._corpus import synthetic_image

    return [synthetic_image(96, 64, seed=40 + i) for i in range(6)]


def calibration_items() -> list[tuple[dict[str, Any], str | None]]:
    """(item, instruction) pairs: texts, images of several sizes and modes, a video, mixtures."""
    from qwen3emb.convert._corpus import CORPUS

    texts = list(CORPUS[:CALIBRATION_TEXTS])
    images = calibration_images()
    frames = calibration_frames()
    items: list[tuple[dict[str, Any], str | None]] = [({"text": t}, None) for t in texts]
    items += [({"image": image}, None) for image in images]
    items += [({"video": frames}, None),
              ({"text": texts[1], "image": images[0]}, CALIBRATION_INSTRUCTION),
              ({"text": texts[4], "image": images[3]}, None),
              ({"text": texts[3], "image": images[5], "video": frames[:4]}, None),
              ({"text": texts[2]}, CALIBRATION_INSTRUCTION),
              ({}, None)]
    return items


def vl_calibration_feeds(manifest: Manifest, vision_graph: Mapping[str, Any]
                         ) -> list[dict[str, np.ndarray]]:
    """One unpadded decoder feed per calibration item.

    Args:
        manifest: the bundle's manifest as far as it is written (root = the staged bundle,
            with its tokenizer files and the vision graph in place).
        vision_graph: the manifest entry of the fp32 vision graph.

    Returns:
        onnxruntime input dicts of the decoder graph.
    """
    from qwen3emb.runtime.vl import VLInputs
    from qwen3emb.runtime.vl_prompt import format_instruction

    inputs = VLInputs(manifest, vision_graph)
    feeds = []
    for i, (item, instruction) in enumerate(calibration_items()):
        prepared = inputs.prepare(item, i, format_instruction(instruction))
        features = inputs.encode_visuals([prepared])
        feeds.append(inputs.decoder_inputs([prepared], features))
    visual = sum(int(f["visual_embeds"].shape[0]) for f in feeds)
    logger.info("calibrating the decoder on %d items (%d visual tokens)", len(feeds), visual)
    return feeds


def vision_calibration_feeds(manifest: Manifest) -> list[dict[str, np.ndarray]]:
    """One vision-graph feed per calibration image, and one for the calibration video, made
    by the runtime's host preprocessing (resize, patches, position tables): one call each,
    as the runtime runs an image or a video.

    Args:
        manifest: the bundle's manifest as far as it is written (its ``vision`` section).

    Returns:
        onnxruntime input dicts of the vision graph.
    """
    from qwen3emb.runtime.vl import vision_feeds, vision_geometry
    from qwen3emb.runtime.vl_video import VideoOptions, video_input
    from qwen3emb.runtime.vl_vision import image_input

    geometry = vision_geometry(manifest)
    visuals = [image_input(image, geometry=geometry, name=f"calibration image {i}")
               for i, image in enumerate(calibration_images())]
    # The video limits in the manifest are the reference values, which VideoOptions defaults to.
    visuals.append(video_input(calibration_frames(), geometry=geometry, options=VideoOptions(),
                               name="calibration video"))
    feeds = [vision_feeds(visual, geometry) for visual in visuals]
    patches = sum(int(np.prod(f["pixel_patches"].shape[:2])) for f in feeds)
    logger.info("calibrating the vision graph on %d images and videos (%d patches)",
                len(feeds), patches)
    return feeds


def vl_rerank_calibration_feeds(manifest: Manifest, vision_graph: Mapping[str, Any]
                                ) -> list[dict[str, np.ndarray]]:
    """One unpadded decoder feed per calibration pair of a Qwen3-VL reranker: the calibration
    items as documents against short text queries (the opening words of other texts), and
    the images as queries against texts, in the reranker's own prompt.

    Args:
        manifest: the staged bundle's manifest (tokenizer files and vision graph in place).
        vision_graph: the manifest entry of the fp32 vision graph.
    """
    from qwen3emb.convert._corpus import CORPUS
    from qwen3emb.runtime.vl_rerank import VLRerankInputs

    inputs = VLRerankInputs(manifest, vision_graph)
    texts = list(CORPUS[:CALIBRATION_TEXTS])
    items = calibration_items()
    pairs: list[tuple[Any, Any, str | None]] = [
        (" ".join(texts[(i + 5) % len(texts)].split()[:6]), item, instruction)
        for i, (item, instruction) in enumerate(items)]
    pairs += [({"image": image}, texts[i % len(texts)], None)
              for i, image in enumerate(calibration_images()[:3])]
    feeds = []
    for query, document, instruction in pairs:
        prepared = inputs.prepare_pairs(query, [document], instruction)
        feeds.append(inputs.decoder_inputs(prepared, inputs.encode_visuals(prepared)))
    logger.info("calibrating the reranker decoder on %d pairs", len(feeds))
    return feeds


VISION_CHOICES: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",), "fp16": ("fp16", "fp32"), "int8": ("int8", "fp32"),
    "int4": ("int4", "int8", "fp32")}
"""The vision graphs a reranker decoder of each precision may run with, cheapest first."""
VISION_SCORE_BUDGET: dict[str, float] = {"fp32": 0.0, "fp16": 0.0025, "int8": 0.01,
                                         "int4": 0.025}
"""How far a vision graph may move the fp32 decoder's score on the calibration pairs, per
decoder precision: half the score floor (the decoder's own search spends the other half)."""


def pair_vision_by_score(stage: Any, manifest: Mapping[str, Any],
                         entries: list[dict[str, Any]]) -> None:
    """Pair each decoder of a Qwen3-VL reranker with the cheapest vision graph whose features
    move the fp32 decoder's score by at most :data:`VISION_SCORE_BUDGET` on the calibration
    pairs (in place: ``vision_precision``, and ``vision_score_diff`` in its settings).

    The vision graphs are searched on the cosine of their outputs, which bounds an embedding's
    error but not a score's: a 4-bit tower at cosine 0.977 moved the score by 0.055 on the
    untied VL fixture, above int4's 0.05 floor with an fp32 decoder.
    """
    import onnxruntime as ort

    from qwen3emb.constants import SCORE

    graphs = [e for e in entries if e.get("kind") == "onnx"]
    decoders = {e["precision"]: e for e in graphs if e.get("graph") == "decoder"}
    visions = {e["precision"]: e for e in graphs if e.get("graph") == "vision"}
    if "fp32" not in decoders or "fp32" not in visions:
        return
    staged = Manifest(root=stage, data={**manifest, "artifacts": entries})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    decoder = ort.InferenceSession(str(stage / decoders["fp32"]["path"]), options,
                                   providers=["CPUExecutionProvider"])
    scores = {}
    for precision, entry in visions.items():
        feeds = vl_rerank_calibration_feeds(staged, entry)
        scores[precision] = np.array([decoder.run([SCORE], f)[0][0] for f in feeds])
    diffs = {p: float(np.abs(s - scores["fp32"]).max()) for p, s in scores.items()}
    for precision, entry in decoders.items():
        choices = [p for p in VISION_CHOICES.get(precision, ("fp32",)) if p in diffs]
        chosen = next((p for p in choices
                       if diffs[p] <= VISION_SCORE_BUDGET.get(precision, 0.0)), "fp32")
        if chosen != entry.get("vision_precision"):
            logger.info("decoder %s runs with the %s vision graph: the %s one moves the score "
                        "by %.4f on the calibration pairs (budget %.4f)", precision, chosen,
                        entry.get("vision_precision"),
                        diffs.get(str(entry.get("vision_precision")), float("nan")),
                        VISION_SCORE_BUDGET.get(precision, 0.0))
        entry["vision_precision"] = chosen
        entry.setdefault("settings", {})["vision_score_diff"] = {
            p: round(diffs[p], 6) for p in choices}
