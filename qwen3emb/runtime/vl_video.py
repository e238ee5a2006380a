"""Videos for Qwen3-VL bundles: decode with PyAV, sample at 1 fps, size frames, patch them.

Sampling follows qwen-vl-utils as the released embedder calls it: ``total / video_fps * fps``
frames, at least 4, at most ``max_frames`` (64) and the frame count, rounded down to an even
number, at ``round(linspace(0, total - 1, n))``. Every frame gets one size from ``smart_resize``
with the video budget (per frame at most ``min(768*32*32, total_pixels / n * 2)`` pixels, at
least 128*32*32). Each temporal group (2 frames) is stamped with the mean of its frames' times.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import (
    VL_FPS,
    VL_FRAME_FACTOR,
    VL_MAX_FRAMES,
    VL_MAX_SOURCE_PIXELS,
    VL_MAX_VIDEO_BYTES,
    VL_MAX_VIDEO_SECONDS,
    VL_MIN_FRAMES,
    VL_VIDEO_MAX_PIXELS,
    VL_VIDEO_MIN_PIXELS,
    VL_VIDEO_TOTAL_PIXELS,
)
from qwen3emb.errors import InputError
from qwen3emb.runtime.common import optional_module
from qwen3emb.runtime.vl_vision import (
    VisionGeometry,
    VisualInput,
    describe_source,
    load_image,
    normalize,
    patchify,
    resize_image,
    smart_resize,
)


@dataclass(frozen=True)
class VideoOptions:
    """User-settable video limits; defaults are the reference values."""

    fps: float = VL_FPS
    max_frames: int = VL_MAX_FRAMES
    min_pixels: int = VL_VIDEO_MIN_PIXELS
    max_pixels: int = VL_VIDEO_MAX_PIXELS
    total_pixels: int = VL_VIDEO_TOTAL_PIXELS
    max_seconds: float = VL_MAX_VIDEO_SECONDS
    max_source_pixels: int = VL_MAX_SOURCE_PIXELS

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise InputError(f"video fps must be positive, got {self.fps}")
        if self.max_frames < VL_FRAME_FACTOR:
            raise InputError(f"max_frames must be >= {VL_FRAME_FACTOR}, got {self.max_frames}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise InputError(f"video pixel limits {self.min_pixels}..{self.max_pixels} are "
                             "not a valid range", hint="Use 0 < min_pixels <= max_pixels")


def _floor(x: float, f: int) -> int:
    return math.floor(x / f) * f


def sample_count(total: int, video_fps: float, options: VideoOptions, name: str) -> int:
    """How many frames to sample from a ``total``-frame video at ``video_fps``.

    Raises:
        InputError: the video has fewer than 2 frames.
    """
    min_frames = math.ceil(VL_MIN_FRAMES / VL_FRAME_FACTOR) * VL_FRAME_FACTOR
    max_frames = _floor(min(options.max_frames, total), VL_FRAME_FACTOR)
    wanted = total / video_fps * options.fps
    count = _floor(min(max(wanted, min_frames), max_frames, total), VL_FRAME_FACTOR)
    if count < VL_FRAME_FACTOR:
        raise InputError(f"video {name} has {total} frame(s); at least {VL_FRAME_FACTOR} are "
                         "needed", hint="Pass it as an image instead")
    return count


def frame_size(height: int, width: int, count: int, options: VideoOptions,
               geometry: VisionGeometry, name: str) -> tuple[int, int]:
    """One (height, width) for every frame of a ``count``-frame video."""
    budget = max(min(VL_VIDEO_MAX_PIXELS, options.total_pixels / count * VL_FRAME_FACTOR),
                 int(options.min_pixels * 1.05))
    budget = min(budget, options.max_pixels)
    return smart_resize(height, width, factor=geometry.factor, min_pixels=options.min_pixels,
                        max_pixels=max(int(budget), options.min_pixels), name=name)


def timestamps(indices: Sequence[int], video_fps: float, merge: int) -> list[float]:
    """Seconds per temporal group: the mean time of its first and last frame."""
    indices = list(indices)
    while len(indices) % merge:
        indices.append(indices[-1])
    times = [i / video_fps for i in indices]
    return [(times[i] + times[i + merge - 1]) / 2 for i in range(0, len(times), merge)]


def _av() -> Any:
    return optional_module("av", "PyAV is needed to decode video files",
                           "pip install 'qwen3emb-export[vl]' (or av), or pass the video as a "
                           "list of frames")


def read_video(path: str | os.PathLike[str], options: VideoOptions, name: str
               ) -> tuple[list[Any], list[int], float]:
    """Decode the sampled frames of a video file.

    Returns:
        RGB PIL frames, their source frame indices, and the stream's frame rate.

    Raises:
        InputError: missing, corrupt or unsupported file, no video stream, longer than
            ``max_seconds``, or frames larger than ``max_source_pixels``.
    """
    av = _av()
    file = Path(path)
    if not file.is_file():
        raise InputError(f"video {name} does not exist", hint="Pass an existing video file")
    if file.stat().st_size > VL_MAX_VIDEO_BYTES:
        raise InputError(f"video {name} is {file.stat().st_size} bytes, above the safety "
                         f"bound of {VL_MAX_VIDEO_BYTES}", hint="Cut or re-encode it")

    def open_stream() -> tuple[Any, Any]:
        try:
            container = av.open(os.fspath(file))
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise InputError(f"video {name} cannot be opened ({e})",
                             hint="Pass an MP4, WebM, MKV, AVI or MOV file") from e
        if not container.streams.video:
            container.close()
            raise InputError(f"video {name} has no video stream",
                             hint="Pass a file with a video track")
        return container, container.streams.video[0]

    container, stream = open_stream()
    try:
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > options.max_source_pixels:
            raise InputError(f"video {name} frames are {width}x{height}, above the safety "
                             f"bound of {options.max_source_pixels} pixels",
                             hint="Downscale the video first")
        if video_fps <= 0:
            raise InputError(f"video {name} has no frame rate", hint="Re-encode the video")
        total = int(stream.frames or 0)
        if total <= 0:
            total = sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError as e:
        raise InputError(f"video {name} is corrupt ({e})", hint="Re-encode the video") from e
    finally:
        container.close()
    if total / video_fps > options.max_seconds:
        raise InputError(f"video {name} lasts {total / video_fps:.0f} s, above the bound of "
                         f"{options.max_seconds:.0f} s", hint="Cut it, or raise max_seconds")
    count = sample_count(total, video_fps, options, name)
    indices = [int(round(x)) for x in np.linspace(0, total - 1, count)]
    wanted = set(indices)
    frames: dict[int, Any] = {}
    container, stream = open_stream()
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames[i] = frame.to_image().convert("RGB")
            if i >= indices[-1]:
                break
    except av.error.FFmpegError as e:
        raise InputError(f"video {name} is corrupt ({e})", hint="Re-encode the video") from e
    finally:
        container.close()
    missing = [i for i in indices if i not in frames]
    if missing:
        raise InputError(f"video {name} ended before frame {missing[0]} of {total}",
                         hint="The file is truncated or its frame count is wrong; re-encode it")
    return [frames[i] for i in indices], indices, video_fps


def video_input(source: Any, *, geometry: VisionGeometry, options: VideoOptions,
                name: str = "video") -> VisualInput:
    """A video file path, or a list of frames (paths, bytes or PIL images), patched.

    A frame list is taken as already sampled at ``options.fps``; more than ``max_frames``
    frames are subsampled uniformly.

    Raises:
        InputError: see :func:`read_video` and :func:`load_image`; an empty frame list.
    """
    if isinstance(source, (str, os.PathLike)):
        label = f"{name} {describe_source(source)}"
        frames, indices, video_fps = read_video(source, options, label)
    elif isinstance(source, (list, tuple)):
        label = f"{name} (frame list)"
        if not source:
            raise InputError(f"{label} is empty", hint="Pass at least one frame")
        chosen = list(range(len(source)))
        if len(chosen) > options.max_frames:
            count = _floor(options.max_frames, VL_FRAME_FACTOR)
            chosen = [int(round(x)) for x in np.linspace(0, len(source) - 1, count)]
        frames = [load_image(source[i], name=f"{name} frame {i}",
                             max_source_pixels=options.max_source_pixels) for i in chosen]
        indices, video_fps = list(range(len(frames))), options.fps
    else:
        raise InputError(f"{name} is a {type(source).__name__}, not a file path or frame list",
                         hint="Pass a video file path or a list of images")
    count = len(frames) + len(frames) % VL_FRAME_FACTOR
    height, width = frame_size(frames[0].height, frames[0].width, count, options, geometry,
                               label)
    pixels = normalize([resize_image(f, height, width) for f in frames], geometry)
    patches, gh, gw = patchify(pixels, geometry)
    return VisualInput("video", patches, (patches.shape[0], gh, gw),
                       timestamps(indices, video_fps, geometry.temporal_patch_size))
