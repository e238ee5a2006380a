"""The Qwen3-VL reference: transformers' ``Qwen3VLModel`` (fp32), fed as the released
embedder feeds it.

The reference follows the released embedder: instruction in the system message, content
ordered videos → images → texts, the checkpoint's chat template with
``add_generation_prompt=True``, images resized by qwen-vl-utils' ``smart_resize`` with
Pillow BICUBIC and patched by transformers' ``Qwen2VLImageProcessorPil`` (no torchvision),
placeholders expanded by ``Qwen3VLProcessor``'s own replacement code, then the last token of
``last_hidden_state`` (after the final norm), L2-normalized. Video frames are decoded and
sampled here, independently of the runtime, and patched frame by frame by the same HF image
processor (its video processor needs torchvision, which does not load with this torch).
Resizing follows qwen-vl-utils (what the released embedder calls), not transformers' own
``smart_resize``; the two differ for images with a side under 16 pixels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import types
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.errors import CheckpointError

logger = logging.getLogger(__name__)

# The released embedder's constants, written out here so a typo in constants.py cannot hide.
REF_DEFAULT_INSTRUCTION = "Represent the user's input."
REF_FACTOR, REF_MIN_PIXELS, REF_MAX_PIXELS = 32, 4 * 32 * 32, 1800 * 32 * 32
REF_FPS, REF_MAX_FRAMES, REF_MIN_FRAMES = 1.0, 64, 4
REF_VIDEO_MIN, REF_VIDEO_MAX, REF_VIDEO_TOTAL = 128 * 32 * 32, 768 * 32 * 32, 10 * 768 * 32 * 32
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"


def reference_smart_resize(height: int, width: int, factor: int, min_pixels: int,
                           max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize``, which the released embedder resizes with.

    Unlike transformers' copy it rounds each side up to at least ``factor`` before checking
    the budget, so an 8x600 image stays 32x608 where transformers' gives 32x576.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError("absolute aspect ratio must be smaller than 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _rgb(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, (str, os.PathLike, bytes)):
        import io

        image = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


class ReferenceVLEmbedder:
    """The released embedder's recipe on transformers' Qwen3VLModel, one item at a time."""

    def __init__(self, checkpoint: Path, model: Any = None) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen3VLModel
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        self.torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
            self.model = model if model is not None else Qwen3VLModel.from_pretrained(
                checkpoint, dtype=torch.float32).eval()
            config = json.loads((Path(checkpoint) / "preprocessor_config.json").read_text())
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"transformers cannot load the reference '{checkpoint}': {e}",
                                  hint="Pass the checkpoint the bundle was exported from") from e
        keep = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
        self.images = Qwen2VLImageProcessorPil(**{k: config[k] for k in keep if k in config})
        self.precision = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.image_id = int(self.model.config.image_token_id)
        self.video_id = int(self.model.config.video_token_id)
        # Qwen3VLProcessor cannot be built without its torchvision video processor; its
        # placeholder expansion only needs these attributes, so call it on a stand-in.
        shim = types.SimpleNamespace(
            image_processor=self.images, video_processor=self.images,
            image_token="<|image_pad|>", video_token="<|video_pad|>",
            vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
        shim._calculate_timestamps = types.MethodType(Qwen3VLProcessor._calculate_timestamps, shim)
        self._shim = shim
        self._processor = Qwen3VLProcessor

    # --- preprocessing (the released embedder + qwen-vl-utils rules) ---------------------

    def fetch_image(self, source: Any) -> Any:
        image = _rgb(source)
        h, w = reference_smart_resize(image.height, image.width, factor=REF_FACTOR,
                            min_pixels=REF_MIN_PIXELS, max_pixels=REF_MAX_PIXELS)
        return image.resize((w, h), resample=3)  # PIL.Image.BICUBIC

    def fetch_video(self, source: Any) -> tuple[list[Any], list[int], float]:
        """Frames resized to one size, their source indices and the frame rate."""
        if isinstance(source, (list, tuple)):
            frames, fps = [_rgb(f) for f in source], REF_FPS
            indices = list(range(len(frames)))
            if len(frames) > REF_MAX_FRAMES:
                picked = np.linspace(0, len(frames) - 1, REF_MAX_FRAMES).round().astype(int)
                frames, indices = [frames[i] for i in picked], list(range(REF_MAX_FRAMES))
        else:
            import av

            with av.open(str(source)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate or 0) or 24.0
                decoded = [f.to_image() for f in container.decode(stream)]
            total = len(decoded)
            low = math.ceil(REF_MIN_FRAMES / 2) * 2
            high = math.floor(min(REF_MAX_FRAMES, total) / 2) * 2
            count = math.floor(min(max(total / fps * REF_FPS, low), high, total) / 2) * 2
            indices = np.linspace(0, total - 1, count).round().astype(int).tolist()
            frames = [decoded[i].convert("RGB") for i in indices]
        count = len(frames) + len(frames) % 2
        budget = max(min(REF_VIDEO_MAX, REF_VIDEO_TOTAL / count * 2), int(REF_VIDEO_MIN * 1.05))
        h, w = reference_smart_resize(frames[0].height, frames[0].width, factor=REF_FACTOR,
                            min_pixels=REF_VIDEO_MIN, max_pixels=int(budget))
        return [f.resize((w, h), resample=3) for f in frames], indices, fps

    def video_patches(self, frames: list[Any]) -> tuple[np.ndarray, list[int]]:
        """HF-patchify each frame, then pair frames into temporal patches."""
        if len(frames) % 2:
            frames = frames + frames[-1:]
        out = self.images(images=frames, do_resize=False, return_tensors="np")
        grid = out["image_grid_thw"][0].tolist()
        per_frame = out["pixel_values"].reshape(len(frames), -1, 3, 2, 16 * 16)
        # Frame 2g fills temporal slot 0, frame 2g+1 slot 1 (HF repeats each frame in both).
        pairs = np.stack([per_frame[0::2, :, :, 0], per_frame[1::2, :, :, 1]], axis=3)
        return pairs.reshape(-1, per_frame.shape[2] * 2 * 256), [len(frames) // 2, *grid[1:]]

    def prompt(self, item: dict[str, Any], instruction: str | None) -> str:
        text = (instruction or "").strip() or REF_DEFAULT_INSTRUCTION
        if not unicodedata.category(text[-1]).startswith("P"):
            text += "."
        content: list[dict[str, Any]] = []
        if item.get("video") is not None:
            content.append({"type": "video", "video": "video"})
        if item.get("image") is not None:
            content.append({"type": "image", "image": "image"})
        if item.get("text") is not None:  # format_model_input: "" is a text, None is none
            content.append({"type": "text", "text": item["text"]})
        if not content:
            content.append({"type": "text", "text": "NULL"})
        conversation: Any = [{"role": "system", "content": [{"type": "text", "text": text}]},
                             {"role": "user", "content": content}]
        return str(self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=True))

    def inputs(self, item: dict[str, Any], instruction: str | None) -> dict[str, Any]:
        """The model inputs of one item, as the released embedder builds them."""
        from transformers.video_utils import VideoMetadata

        torch = self.torch
        text = self.prompt(item, instruction)
        kwargs: dict[str, Any] = {}
        if item.get("video") is not None:
            frames, indices, fps = self.fetch_video(item["video"])
            patches, grid = self.video_patches(frames)
            meta = VideoMetadata(total_num_frames=len(indices), fps=fps, frames_indices=indices)
            placeholder = self._processor.replace_video_token(
                self._shim,  # type: ignore[arg-type]
                {"video_grid_thw": torch.tensor([grid]), "video_metadata": [meta]}, 0)
            text = text.replace(VIDEO_BLOCK, placeholder, 1)
            kwargs.update(pixel_values_videos=torch.from_numpy(patches),
                          video_grid_thw=torch.tensor([grid]))
        if item.get("image") is not None:
            out = self.images(images=[self.fetch_image(item["image"])], do_resize=False,
                              return_tensors="np")
            grid = torch.from_numpy(out["image_grid_thw"])
            text = text.replace("<|image_pad|>", self._processor.replace_image_token(
                self._shim, {"image_grid_thw": grid}, 0), 1)  # type: ignore[arg-type]
            kwargs.update(pixel_values=torch.from_numpy(out["pixel_values"]), image_grid_thw=grid)
        ids = torch.tensor([self.tokenizer(text)["input_ids"][:8192]])
        if kwargs:
            kwargs["mm_token_type_ids"] = ((ids == self.image_id).int()
                                           + 2 * (ids == self.video_id).int())
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kwargs}

    def embed(self, item: dict[str, Any], instruction: str | None = None) -> np.ndarray:
        """The reference embedding of one item (full width, unit norm)."""
        with self.torch.no_grad():
            hidden = self.model(**self.inputs(item, instruction)).last_hidden_state
        vec = hidden[0, -1].float()
        return (vec / vec.norm().clamp_min(1e-12)).numpy()

    def visual(self, inputs: dict[str, Any]) -> np.ndarray:
        """HF vision tower output (merged embeds, then each deepstack map), flattened."""
        kind = "" if "pixel_values" in inputs else "_videos"
        pixels = inputs[f"pixel_values{kind}"]
        grid = inputs["image_grid_thw" if not kind else "video_grid_thw"]
        with self.torch.no_grad():
            out = self.model.visual(pixels, grid_thw=grid)
        parts = [out.pooler_output, *out.deepstack_features]
        return np.concatenate([p.numpy().reshape(-1) for p in parts])
