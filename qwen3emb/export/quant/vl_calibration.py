"""Calibration inputs of the Qwen3-VL decoder graph: what the runtime feeds it, on text, images,
videos and mixtures.

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


def calibration_items() -> list[tuple[dict[str, Any], str | None]]:
    """(item, instruction) pairs: texts, images of several sizes and modes, a video, mixtures."""
    from qwen3emb.convert._corpus import CORPUS, synthetic_image

    texts = list(CORPUS[:CALIBRATION_TEXTS])
    images = [synthetic_image(w, h, mode=mode, seed=seed) for w, h, mode, seed in (
        (256, 192, "RGB", 31), (64, 64, "RGB", 32), (900, 120, "RGB", 33),
        (140, 300, "RGB", 34), (160, 160, "L", 35), (480, 360, "RGB", 36))]
    frames = [synthetic_image(96, 64, seed=40 + i) for i in range(6)]
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
