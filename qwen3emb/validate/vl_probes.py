"""The multimodal probe set: texts, images of awkward sizes and modes, videos, mixtures.

Images are synthesized (gradients, stripes and noise, so that resizing and patch order
matter); the file video is written with PyAV into a temporary directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3emb.convert._corpus import synthetic_image


@dataclass(frozen=True)
class VLProbe:
    """One named item, and the instruction it is embedded with (``None`` = default)."""

    name: str
    item: dict[str, Any]
    instruction: str | None = None

    @property
    def kind(self) -> str:
        """text, image, video, text+image, ... (what the item holds, in reference order)."""
        return "+".join(k for k in ("video", "image", "text") if self.item.get(k) is not None) \
            or "empty"


def write_test_video(path: Path, *, frames: int = 8, fps: int = 4, width: int = 64,
                     height: int = 48) -> Path:
    """Encode a short synthetic MPEG-4 video with PyAV (moving stripes)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = synthetic_image(width, height, seed=100 + i)
            frame = av.VideoFrame.from_image(image.transform(image.size, 0, (1, 0, 3 * i, 0, 1, 0)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def build_vl_probes(workdir: Path) -> list[VLProbe]:
    """Every probe kind: text only, images (normal, below the minimum, very wide, very tall,
    RGBA, grayscale), a frame-list video, a file video, text+image, everything at once, and
    an instruction without final punctuation."""
    video_file = write_test_video(workdir / "probe.mp4")
    frames = [synthetic_image(64, 48, seed=200 + i) for i in range(5)]
    image = synthetic_image(224, 160, seed=1)
    return [
        VLProbe("text", {"text": "A photo of a cat sitting on a red sofa."}),
        VLProbe("text-multilingual", {"text": "敏捷的棕色狐狸 — le renard brun 🦊"}),
        VLProbe("empty", {}),
        VLProbe("empty-text", {"text": ""}),
        VLProbe("image", {"image": image}),
        VLProbe("image-tiny", {"image": synthetic_image(20, 12, seed=2)}),
        VLProbe("image-wide", {"image": synthetic_image(1600, 40, seed=3)}),
        VLProbe("image-tall", {"image": synthetic_image(30, 900, seed=4)}),
        VLProbe("image-thin", {"image": synthetic_image(600, 8, seed=9)}),
        VLProbe("image-rgba", {"image": synthetic_image(120, 90, mode="RGBA", seed=5)}),
        VLProbe("image-gray", {"image": synthetic_image(100, 100, mode="L", seed=6)}),
        VLProbe("image-large", {"image": synthetic_image(640, 480, seed=7)}),
        VLProbe("video-frames", {"video": frames}),
        VLProbe("video-file", {"video": str(video_file)}),
        VLProbe("text+image", {"text": "What is in this picture?", "image": image}),
        VLProbe("mixed", {"text": "a clip and a still", "image": synthetic_image(96, 64, seed=8),
                          "video": frames[:4]}),
        VLProbe("instruction", {"text": "red sofa"},
                instruction="Retrieve images that match the query"),
    ]
