"""Parity of a Qwen3-VL bundle against the reference on the multimodal probes.

ONNX bundles report each decoder precision (``decoder.onnx``, ``decoder_fp16.onnx``, ...: the
whole pipeline, host preprocessing + its paired vision graph + the decoder, each probe alone
and all in one mixed batch, and a Matryoshka cut) and each vision precision alone
(``vision.onnx``, ``vision_fp16.onnx``: visual and deepstack outputs vs the HF vision tower,
same patches), each against its own floor (see :mod:`qwen3emb.validate.vl_onnx`). Each GGUF
text model (with its mmproj) is run through llama.cpp on the text and image probes, images
resized on the host as the reference does, against its floor; the highest-precision one is
also run with llama.cpp's own image resizing, reported as an informational artifact
(measured, not gated). Video probes are outside the GGUF runtime and are listed as skipped.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import FLOORS
from qwen3emb.errors import Qwen3EmbError
from qwen3emb.validate.compare import ArtifactResult
from qwen3emb.validate.vl_onnx import cut_reference, onnx_graphs, validate_vl_onnx
from qwen3emb.validate.vl_probes import build_vl_probes
from qwen3emb.validate.vl_reference import ReferenceVLEmbedder

logger = logging.getLogger(__name__)


class VLSuite:
    """The multimodal probes through every ONNX pipeline and GGUF model of a Qwen3-VL bundle.

    Args:
        bundle: the bundle directory; manifest: its manifest; checkpoint: the reference.
        model: an already loaded fp32 ``Qwen3VLModel`` (saves a second load).
        providers: onnxruntime providers for the artifacts.
    """

    implementation = "transformers Qwen3VLModel"

    def __init__(self, bundle: Any, manifest: Any, checkpoint: Any, *, model: Any = None,
                 providers: Any = None, **_: Any) -> None:
        self.bundle, self.manifest, self.checkpoint = bundle, manifest, checkpoint
        self.model, self.providers = model, providers
        self.probe_max_length = manifest.max_length
        self.probe_count = 0
        self.precision = "float32"

    def held_precisions(self) -> list[str]:
        held = {a["precision"] for group in onnx_graphs(self.manifest) for a in group}
        return sorted(held | set(self.manifest.models("gguf")))

    def run(self, precisions: Sequence[str] | None, progress: bool = False
            ) -> list[ArtifactResult]:
        ref = ReferenceVLEmbedder(self.checkpoint.path, model=self.model)
        self.precision = ref.precision
        manifest = self.manifest
        results: list[ArtifactResult] = []
        out_dim = int(manifest.embedding["output_dim"])
        with tempfile.TemporaryDirectory(prefix="qwen3emb-vl-probes-") as tmp:
            probes = build_vl_probes(Path(tmp))
            self.probe_count = len(probes)
            refs = cut_reference(np.stack([ref.embed(p.item, p.instruction) for p in probes]),
                                 out_dim)
            if "onnx" in manifest.data:
                results += validate_vl_onnx(self.bundle, manifest, ref, probes, refs,
                                            self.providers, precisions)
            results += _validate_gguf(self.bundle, manifest, probes, refs, precisions)
        return results


GGUF_PREFERENCE = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


def _validate_gguf(bundle: Any, manifest: Any, probes: list[Any], refs: np.ndarray,
                   precisions: Sequence[str] | None = None) -> list[ArtifactResult]:
    """One artifact per GGUF type (host resize, gated by its floor), plus llama.cpp's own
    image resizing measured on the highest precision (informational)."""
    models = {t: e for t, e in manifest.models("gguf").items()
              if not precisions or t in precisions}
    if not models:
        return []
    from qwen3emb.runtime.gguf_vl import GGUFVLEmbedder

    supported = [i for i, p in enumerate(probes) if p.item.get("video") is None]
    skipped = [p.name for p in probes if p.item.get("video") is not None]
    names = [f"{p.kind}:{p.name}" for p in probes]
    note = f"video probes skipped (not supported by the GGUF runtime): {', '.join(skipped)}"
    out_dim = int(manifest.embedding["output_dim"])
    results = []
    order = sorted(models, key=lambda t: GGUF_PREFERENCE.index(t)
                   if t in GGUF_PREFERENCE else len(GGUF_PREFERENCE))
    for gguf_type in order:
        entry = models[gguf_type]
        result = ArtifactResult(artifact=entry["path"], kind="gguf", precision=gguf_type,
                                floor=FLOORS.get(gguf_type, FLOORS["q4_k_m"]),
                                note=f"mmproj {entry.get('mmproj')}; {note}")
        results.append(result)
        try:
            with GGUFVLEmbedder(bundle, gguf_type=gguf_type) as runner:
                for i in supported:
                    out = runner.encode([probes[i].item], instruction=probes[i].instruction)
                    result.add("single", [names[i]], out, refs[i:i + 1])
                if out_dim == manifest.dim:
                    width = max(manifest.mrl_min, out_dim // 2)
                    plain = [i for i in supported if probes[i].instruction is None][:3]
                    cut = runner.encode([probes[i].item for i in plain], dimensions=width)
                    result.add(f"mrl-{width}", [names[i] for i in plain], cut,
                               cut_reference(refs[plain], width))
        except Qwen3EmbError as e:
            result.error = e.one_line()
    best = order[0]
    images = [i for i in supported if probes[i].item.get("image") is not None]
    own = ArtifactResult(
        artifact=f"{models[best]['path']} (llama.cpp image resize)", kind="gguf",
        precision=best, floor=FLOORS.get(best, FLOORS["q4_k_m"]), informational=True,
        note="images handed to libmtmd at their source size, resized by llama.cpp's own "
             "algorithm instead of Pillow BICUBIC; measured, not gated (docs/gguf.md)")
    try:
        with GGUFVLEmbedder(bundle, gguf_type=best, resize="llama.cpp") as runner:
            for i in images:
                out = runner.encode([probes[i].item], instruction=probes[i].instruction)
                own.add("llama-resize", [names[i]], out, refs[i:i + 1])
    except Qwen3EmbError as e:
        own.error = e.one_line()
    return [*results, own]
