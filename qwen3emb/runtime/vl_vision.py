"""Host-side image and video preprocessing for Qwen3-VL bundles: numpy + Pillow (+ PyAV).

Reproduces the released embedder's steps: RGB conversion (RGBA over white), ``smart_resize``
to multiples of 32 within a pixel budget, Pillow BICUBIC resize, scale to [0, 1], normalize
with mean/std 0.5, repeat an image to the temporal patch size, and cut 1536-value patches
(3x2x16x16) in 2x2 merge-block order. Also the tables the vision graph takes as inputs
(bilinear taps into the learned position table, rotary (row, col) ids).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import (
    VL_IMAGE_FACTOR,
    VL_IMAGE_MEAN,
    VL_IMAGE_STD,
    VL_MAX_ASPECT_RATIO,
    VL_MAX_PIXELS,
    VL_MAX_SOURCE_PIXELS,
    VL_MERGE_SIZE,
    VL_MIN_PIXELS,
    VL_PATCH_SIZE,
    VL_TEMPORAL_PATCH_SIZE,
)
from qwen3emb.errors import InputError
from qwen3emb.runtime.common import optional_module


@dataclass(frozen=True)
class VisionGeometry:
    """Patch geometry of a vision tower (from the bundle manifest)."""

    patch_size: int = VL_PATCH_SIZE
    merge_size: int = VL_MERGE_SIZE
    temporal_patch_size: int = VL_TEMPORAL_PATCH_SIZE
    position_table_side: int = 48
    mean: tuple[float, ...] = VL_IMAGE_MEAN
    std: tuple[float, ...] = VL_IMAGE_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass
class VisualInput:
    """One image or video, patched: ``patches`` [groups, patches_per_group, 1536]."""

    kind: str  # "image" or "video"
    patches: np.ndarray
    grid: tuple[int, int, int]  # (temporal groups, patch rows, patch cols)
    timestamps: list[float] = field(default_factory=list)  # per temporal group (videos)

    @property
    def tokens_per_group(self) -> int:
        return self.grid[1] * self.grid[2] // 4

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.tokens_per_group


def _pil() -> Any:
    return optional_module("PIL.Image", "Pillow is needed for images and videos",
                           "pip install 'qwen3emb-export[vl]' (or Pillow)")


def _round(x: float, f: int) -> int:
    return round(x / f) * f


def smart_resize(height: int, width: int, *, factor: int = VL_IMAGE_FACTOR,
                 min_pixels: int = VL_MIN_PIXELS, max_pixels: int = VL_MAX_PIXELS,
                 name: str = "image") -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, pixel count in [min, max], aspect kept.

    Raises:
        InputError: aspect ratio above 200 (the reference refuses these too).
    """
    if min(height, width) < 1:
        raise InputError(f"{name} is empty ({width}x{height} pixels)")
    ratio = max(height, width) / min(height, width)
    if ratio > VL_MAX_ASPECT_RATIO:
        raise InputError(
            f"{name} has aspect ratio {ratio:.0f}:1 ({width}x{height}), above the "
            f"model's limit of {VL_MAX_ASPECT_RATIO}:1",
            hint="Crop or pad it to a less extreme shape",
        )
    h_bar = max(factor, _round(height, factor))
    w_bar = max(factor, _round(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def describe_source(source: Any) -> str:
    """A short name for an input, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def load_image(source: Any, *, name: str = "image",
               max_source_pixels: int = VL_MAX_SOURCE_PIXELS) -> Any:
    """Open a path, bytes or PIL image as an RGB PIL image (RGBA composited on white).

    Raises:
        InputError: missing, corrupt or unsupported file; more than ``max_source_pixels``.
    """
    Image = _pil()
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray, str, os.PathLike)):
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        if not isinstance(handle, io.BytesIO) and not Path(handle).is_file():
            raise InputError(f"{name} {describe_source(source)} does not exist or is not a file",
                             hint="Pass an existing image file, bytes or a PIL image")
        try:
            image = Image.open(handle)
        except Image.DecompressionBombError as e:
            raise InputError(f"{name} {describe_source(source)} is refused as a decompression "
                             f"bomb ({e})", hint="Downscale it first") from e
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"{name} {describe_source(source)} is not a readable image ({e})",
                             hint="Pass a PNG, JPEG, WebP, GIF, BMP or TIFF file") from e
    else:
        raise InputError(f"{name} is a {type(source).__name__}, not a path, bytes or PIL image",
                         hint="Pass a file path, the file's bytes or a PIL.Image")
    width, height = image.size
    if width * height > max_source_pixels:
        raise InputError(
            f"{name} {describe_source(source)} has {width}x{height} = {width * height} pixels, "
            f"above the safety bound of {max_source_pixels} (decompression bomb?)",
            hint="Downscale it first, or raise max_source_pixels if it is genuine",
        )
    try:
        image.load()
        if image.mode == "RGBA":
            white = Image.new("RGB", image.size, (255, 255, 255))
            white.paste(image, mask=image.split()[3])
            return white
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{name} {describe_source(source)} is corrupt or truncated ({e})",
                         hint="Re-save or re-download the file") from e


def resize_image(image: Any, height: int, width: int) -> Any:
    """Pillow BICUBIC resize to (height, width) (no-op when already that size)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=_pil().BICUBIC)


def normalize(frames: list[Any], geometry: VisionGeometry) -> np.ndarray:
    """RGB PIL frames → float32 [frames, 3, H, W], scaled to [0, 1] and normalized."""
    pixels = np.stack([np.asarray(f, dtype=np.uint8) for f in frames]).astype(np.float32)
    pixels = pixels * np.float32(1 / 255)
    mean = np.asarray(geometry.mean, dtype=np.float32)
    std = np.asarray(geometry.std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(0, 3, 1, 2)


def patchify(frames: np.ndarray, geometry: VisionGeometry) -> tuple[np.ndarray, int, int]:
    """[frames, C, H, W] → [groups, grid_h * grid_w, C*T*P*P] in 2x2 merge-block order.

    An odd frame count is padded with its last frame; an image is one frame repeated.
    """
    t = geometry.temporal_patch_size
    if frames.shape[0] % t:
        pad = np.repeat(frames[-1:], t - frames.shape[0] % t, axis=0)
        frames = np.concatenate([frames, pad])
    n, c, height, width = frames.shape
    p, m = geometry.patch_size, geometry.merge_size
    gh, gw, groups = height // p, width // p, n // t
    x = frames.reshape(groups, t, c, gh // m, m, p, gw // m, m, p)
    # → (groups, blocks_h, blocks_w, m, m, C, T, P, P)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(groups, gh * gw, c * t * p * p)), gh, gw


def image_input(source: Any, *, geometry: VisionGeometry, min_pixels: int = VL_MIN_PIXELS,
                max_pixels: int = VL_MAX_PIXELS, name: str = "image",
                max_source_pixels: int = VL_MAX_SOURCE_PIXELS) -> VisualInput:
    """Load, resize and patch one image."""
    image = load_image(source, name=name, max_source_pixels=max_source_pixels)
    height, width = smart_resize(image.height, image.width, factor=geometry.factor,
                                 min_pixels=min_pixels, max_pixels=max_pixels, name=name)
    frames = normalize([resize_image(image, height, width)], geometry)
    patches, gh, gw = patchify(np.repeat(frames, geometry.temporal_patch_size, axis=0),
                               geometry)
    return VisualInput("image", patches, (1, gh, gw))


def block_order(grid_h: int, grid_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of a grid, in merge-block order (int64 [h*w] each)."""
    grid_rows, grid_cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    rows = grid_rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = grid_cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return rows.astype(np.int64), cols.astype(np.int64)


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    # Bilinear, align_corners=True, border clamp; float32 in the order torch computes it.
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    dist = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.clip(np.float32(1) - dist, 0, None).astype(np.float32)


def vision_tables(grid_h: int, grid_w: int, geometry: VisionGeometry
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs of the vision graph that depend only on the grid.

    Returns:
        ``pos_embed_indices`` int64 [h*w, 4], ``pos_embed_weights`` float32 [h*w, 4] (bilinear
        resampling of the learned side x side position table), ``vision_position_ids`` int64
        [h*w, 2] (row, col for the 2-D rotary embedding); all in merge-block order.
    """
    side = geometry.position_table_side
    rows, cols = block_order(grid_h, grid_w, geometry.merge_size)
    h_taps, h_weights = _axis_taps(rows, grid_h, side)
    w_taps, w_weights = _axis_taps(cols, grid_w, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int64), weights.astype(np.float32), np.stack([rows, cols], 1)
