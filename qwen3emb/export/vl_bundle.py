"""Write a Qwen3-VL-Embedding bundle: ``onnx/vision.onnx`` + ``onnx/decoder.onnx`` and/or
``gguf/model-<type>.gguf`` + ``gguf/mmproj-<type>.gguf``, tokenizer, chat template, preprocessor
config, manifest and parity report, atomically."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen3emb.constants import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    GGUF_DIR,
    IM_START_TOKEN,
    IMAGE_PAD_TOKEN,
    MANIFEST_FILE,
    NORMALIZATION,
    ONNX_DIR,
    POOLING,
    TOKENIZER_FILES,
    VIDEO_PAD_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
    VL_ASSISTANT_PROMPT,
    VL_DEFAULT_INSTRUCTION,
    VL_EMPTY_TEXT,
    VL_FPS,
    VL_FRAME_FACTOR,
    VL_MAX_FRAMES,
    VL_MAX_PIXELS,
    VL_MIN_FRAMES,
    VL_MIN_PIXELS,
    VL_TIMESTAMP_FORMAT,
    VL_VIDEO_MAX_PIXELS,
    VL_VIDEO_MIN_PIXELS,
    VL_VIDEO_TOTAL_PIXELS,
)
from qwen3emb.convert.checkpoint import Checkpoint
from qwen3emb.errors import CheckpointError, OutputError
from qwen3emb.export.bundle import (
    ExportResult,
    _versions,
    load_tokenizer_json,
    record_parity,
    staged_directory,
)
from qwen3emb.export.onnx import EXTERNAL_DATA_THRESHOLD, check_graph_contract
from qwen3emb.export.spec import GraphSpec, vl_graph_specs
from qwen3emb.manifest import file_entry, write_json_atomic

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json")
"""Copied unchanged when present; the runtime does not need them, but they document the model."""


def check_vl_tokenizer(checkpoint: Checkpoint) -> dict[str, Any]:
    """Check that the tokenizer knows the chat and vision tokens at the ids config.json uses.

    Returns:
        Tokenizer facts for the manifest.

    Raises:
        CheckpointError: no tokenizer.json, or a special token missing or at another id.
    """
    tokenizer = load_tokenizer_json(checkpoint.path)
    config = checkpoint.config
    wanted = {
        IMAGE_PAD_TOKEN: config.get("image_token_id"),
        VIDEO_PAD_TOKEN: config.get("video_token_id"),
        VISION_START_TOKEN: config.get("vision_start_token_id"),
        VISION_END_TOKEN: config.get("vision_end_token_id"),
        IM_START_TOKEN: None,
    }
    problems = []
    for token, want in wanted.items():
        got = tokenizer.token_to_id(token)
        if got is None or (want is not None and got != int(want)):  # config may lack some
            problems.append(f"{token} is {got}, config.json says {want}")
    if problems:
        raise CheckpointError(f"tokenizer.json does not match config.json: {'; '.join(problems)}",
                              hint="Use the tokenizer released with the checkpoint")
    tail = tokenizer.encode(VL_ASSISTANT_PROMPT).ids
    return {
        "image_token_id": tokenizer.token_to_id(IMAGE_PAD_TOKEN),
        "video_token_id": tokenizer.token_to_id(VIDEO_PAD_TOKEN),
        "vision_start_token_id": tokenizer.token_to_id(VISION_START_TOKEN),
        "vision_end_token_id": tokenizer.token_to_id(VISION_END_TOKEN),
        "pooled_token_id": tail[-1],
        "padding_side": "right",
    }


def _export_graph(module: Any, example: tuple[Any, ...], dynamic: dict[str, Any],
                  spec: GraphSpec, out_path: Path) -> Path:
    """Export one module with the dynamo exporter; rename its I/O axes to the spec's names."""
    import onnx
    import torch

    captured = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(captured):
            program = torch.onnx.export(
                module, example, dynamo=True, input_names=spec.input_names,
                output_names=spec.output_names, opset_version=spec.opset,
                dynamic_shapes=dynamic, optimize=True, verbose=False,
            )
    except Exception as e:
        logger.debug("exporter output:\n%s", captured.getvalue())
        raise OutputError(
            f"torch.onnx.export of the {spec.name} graph failed: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200]}",
            hint="Run with QWEN3EMB_DEBUG=1 for the traceback; check torch/transformers versions",
        ) from e
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise OutputError(f"torch.onnx.export returned nothing for the {spec.name} graph")
    model = program.model_proto
    # The exporter names derived axes after its symbols ("4*blocks", "groups*s79").
    for values, specs in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        for value, tensor in zip(values, specs):
            for dim, axis in zip(value.type.tensor_type.shape.dim, tensor.axes):
                if not axis.isdigit():
                    dim.dim_param = axis
    weight_bytes = sum(
        int(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize) * math.prod(t.dims)
        for t in model.graph.initializer
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, os.fspath(out_path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=out_path.name + ".data",
                        size_threshold=1024)
    else:
        onnx.save_model(model, os.fspath(out_path))
    check_graph_contract(out_path, spec)  # type: ignore[arg-type]
    logger.info("wrote %s (%.1f MB of weights)", out_path, weight_bytes / 1e6)
    return out_path


def export_vl_graphs(family: Any, backbone: Any, onnx_dir: Path, specs: tuple[GraphSpec, ...],
                     dimensions: int | None) -> list[Path]:
    """Export ``vision.onnx`` and ``decoder.onnx`` (fp32, dynamic shapes) into ``onnx_dir``."""
    import torch

    vision_spec, decoder_spec = specs
    Dim = torch.export.Dim
    patch_dim = int(vision_spec.inputs[0].axes[2])
    hidden, deepstack = family.embedding_dim, family.deepstack_layers
    # Example sizes avoid 0 and 1 (torch.export specializes them); patches come in 2x2 blocks.
    generator = torch.Generator().manual_seed(0)
    groups, patches = 2, 16
    vision_example = (
        torch.randn(groups, patches, patch_dim, generator=generator),
        torch.randint(0, 2304, (patches, 4), generator=generator),
        torch.rand(patches, 4, generator=generator),
        torch.randint(0, 4, (patches, 2), generator=generator),
    )
    per_patch = {0: 4 * Dim("blocks")}
    vision_dynamic = {"pixel_patches": {0: Dim("groups"), 1: per_patch[0]},
                      "pos_embed_indices": per_patch, "pos_embed_weights": per_patch,
                      "vision_position_ids": per_patch}
    batch, sequence, visual = 2, 12, 6
    ids = torch.randint(0, 1000, (batch, sequence), generator=generator)
    ids[0, 2:5] = int(family.config["image_token_id"])
    ids[1, 3:6] = int(family.config["video_token_id"])
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    decoder_example = (ids, mask, torch.arange(sequence).expand(3, batch, sequence).contiguous(),
                       torch.randn(visual, hidden, generator=generator),
                       torch.randn(deepstack, visual, hidden, generator=generator))
    b, s, v = Dim("batch"), Dim("sequence"), Dim("visual_tokens", min=0)
    decoder_dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s},
                       "position_ids": {1: b, 2: s}, "visual_embeds": {0: v},
                       "deepstack_embeds": {1: v}}
    logger.info("tracing the Qwen3-VL vision and decoder graphs (dynamo, opset %d)",
                vision_spec.opset)
    return [
        _export_graph(family.vision_module(backbone), vision_example, vision_dynamic,
                      vision_spec, onnx_dir / "vision.onnx"),
        _export_graph(family.embedding_module(backbone, dimensions), decoder_example,
                      decoder_dynamic, decoder_spec, onnx_dir / "decoder.onnx"),
    ]


def _vision_facts(family: Any) -> dict[str, Any]:
    vision = family.vision_config
    side = int(round(int(vision.get("num_position_embeddings", 2304)) ** 0.5))
    return {
        "patch_size": int(vision["patch_size"]),
        "merge_size": int(vision.get("spatial_merge_size", 2)),
        "temporal_patch_size": int(vision.get("temporal_patch_size", 2)),
        "position_table_side": side,
        "deepstack_layers": family.deepstack_layers,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": "PIL.BICUBIC",
        "min_pixels": VL_MIN_PIXELS,
        "max_pixels": VL_MAX_PIXELS,
        "video": {"fps": VL_FPS, "max_frames": VL_MAX_FRAMES, "min_frames": VL_MIN_FRAMES,
                  "frame_factor": VL_FRAME_FACTOR, "min_pixels": VL_VIDEO_MIN_PIXELS,
                  "max_pixels": VL_VIDEO_MAX_PIXELS, "total_pixels": VL_VIDEO_TOTAL_PIXELS,
                  "timestamp_format": VL_TIMESTAMP_FORMAT},
    }


def export_vl_bundle(checkpoint: Checkpoint, family: Any, out_path: Path, *,
                     dimensions: int | None, max_length: int, opset: int, validate: bool,
                     force: bool, source: str, formats: Sequence[str] = ("onnx",),
                     gguf_types: Sequence[str] = (), precisions: Sequence[str] = ("fp32",),
                     int8_scheme: str | None = None) -> ExportResult:
    """Export a Qwen3-VL checkpoint to a bundle (called by :func:`export_bundle`).

    ``formats`` may hold ``"onnx"`` and/or ``"gguf"``; ``gguf_types`` are the text GGUF
    types (each paired with an f32 or f16 mmproj, see :func:`export_vl_gguf`). ``precisions``
    are the ONNX decoder precisions (fp32 always; fp16, int8, int4); the vision graph is
    written in fp32 and, when fp16 is asked for, in fp16 (see ``VISION_PRECISIONS``).
    """
    from qwen3emb.export.precisions import check_precisions

    onnx_precisions = check_precisions(precisions, int8_scheme)
    if gguf_types:
        from qwen3emb.export.gguf import check_types

        check_types(gguf_types)
    tokenizer = check_vl_tokenizer(checkpoint)
    out_dim = dimensions or family.embedding_dim
    vision = family.vision_config
    patch_dim = (int(vision.get("in_channels", 3)) * int(vision.get("temporal_patch_size", 2))
                 * int(vision["patch_size"]) ** 2)
    specs = vl_graph_specs(patch_dim=patch_dim, hidden=family.embedding_dim,
                           deepstack=family.deepstack_layers, dim=out_dim, opset=opset)
    with staged_directory(out_path, force=force) as stage:
        backbone = family.load_backbone() if "onnx" in formats or validate else None
        # Copied first: the int8 decoder's calibration runs the staged bundle's tokenizer.
        support: list[dict[str, Any]] = []
        for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
            if (checkpoint.path / name).is_file():
                shutil.copyfile(checkpoint.path / name, stage / name)
                role = "tokenizer" if name in TOKENIZER_FILES else "processor"
                support.append(file_entry(stage, stage / name, kind=role, role=role))
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            **family.describe(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"model": source, "weights": checkpoint.weights_sha256()},
            "embedding": {"dim": family.embedding_dim, "output_dim": out_dim,
                          "mrl_min": family.mrl_min, "mrl_max": out_dim, "pooling": POOLING,
                          "normalization": NORMALIZATION,
                          "pooled_token": "the final newline of '<|im_start|>assistant\\n'"},
            "prompt": {"default_instruction": VL_DEFAULT_INSTRUCTION,
                       "instruction_place": "system message; '.' appended unless it ends in "
                                            "punctuation",
                       "content_order": ["video", "image", "text"],
                       "empty_input": VL_EMPTY_TEXT,
                       "add_generation_prompt": True},
            "tokenizer": {**tokenizer, "max_length": max_length,
                          "files": [a["path"] for a in support if a.get("role") == "tokenizer"]},
            "vision": _vision_facts(family),
            **({"onnx": {spec.name: spec.to_dict() for spec in specs}}
               if "onnx" in formats else {}),
            **({"gguf": _gguf_facts()} if gguf_types else {}),
            "artifacts": support,
            "parity": {"status": "not-run"},
            "versions": _versions(),
        }
        artifacts: list[dict[str, Any]] = []
        if "onnx" in formats:
            artifacts += _export_onnx_artifacts(family, backbone, stage, specs, dimensions,
                                                onnx_precisions, int8_scheme, manifest)
        if gguf_types:
            artifacts += _export_gguf_artifacts(checkpoint, stage, gguf_types, max_length)
        manifest["artifacts"] = artifacts + support
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        report = None
        if validate:
            report = _validate_vl_into(stage, checkpoint.path, manifest, backbone)
    logger.info("bundle written to %s", out_path)
    return ExportResult(bundle=out_path, manifest=manifest, report=report)


VISION_PRECISIONS = ("fp32", "fp16")
"""The vision graph's precisions. It holds ~19% of the 2B's weights and ~7% of the 8B's, so
int8/int4 decoders run with the fp32 vision graph, and fp16 vision is written only with
``--precision fp16`` (paired with the fp16 decoder); ``VLEmbedder(vision_precision=...)`` may
pair them otherwise."""


VL_DEFAULT_INT8_SCHEME = "mixed"
"""The Qwen3-VL decoder's int8 scheme unless ``--int8-scheme`` says otherwise. Min cosine on
the VL outlier fixture, each probe alone / all probes in one batch (scripts/measure_vl_int8.py):
mixed 0.99954 / 0.99918, nbits8 0.99962 / 0.99962, smoothquant 0.99706 / 0.98462, dynamic
0.99625 / 0.98750. smoothquant and dynamic quantize every MatMul's activations with one scale
per call, and a batch mixing texts with images shares the scale of its largest item (the
per-item peak of a down_proj input spans 1.0 to 21 across the probes), so they fail the floor
batched. mixed quantizes activations only where a norm made them comparable across items; on
a 4-layer 0.6B-width model (batch 8 x 128, 2 threads, two runs on a shared machine) it ran
1.7-1.8x faster than nbits8 and 1.5-1.6x faster than fp32, smoothquant 2.5-2.7x faster than
fp32 (scripts/time_int8_schemes.py)."""


def _export_onnx_artifacts(family: Any, backbone: Any, stage: Path,
                           specs: tuple[GraphSpec, ...], dimensions: int | None,
                           precisions: Sequence[str], int8_scheme: str | None,
                           manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Both fp32 graphs, then each requested precision of each, through the precision module.

    Every decoder entry names the vision precision it is validated and run with
    (``vision_precision``): its own when the bundle has it, else fp32.
    """
    from qwen3emb.export.precisions import build_precisions
    from qwen3emb.manifest import Manifest

    vision_spec, decoder_spec = specs
    vision_path, decoder_path = export_vl_graphs(family, backbone, stage / ONNX_DIR, specs,
                                                 dimensions)
    visions = build_precisions(stage, vision_path, vision_spec,
                               [p for p in precisions if p in VISION_PRECISIONS],
                               entry={"role": "vision", "graph": "vision"})
    vision_fp32 = next(e for e in visions if e.get("graph") == "vision")

    def calibration() -> list[dict[str, Any]]:
        from qwen3emb.export.vl_calibration import vl_calibration_feeds

        staged = Manifest(root=stage, data={**manifest, "artifacts": visions})
        return vl_calibration_feeds(staged, vision_fp32)

    decoders = build_precisions(stage, decoder_path, decoder_spec, precisions,
                                int8_scheme=int8_scheme or VL_DEFAULT_INT8_SCHEME,
                                calibration=calibration, entry={"graph": "decoder"})
    paired = {e["precision"] for e in visions if e.get("graph") == "vision"}
    for entry in decoders:
        if entry.get("graph") == "decoder":
            entry["vision_precision"] = entry["precision"] if entry["precision"] in paired \
                else "fp32"
    return decoders + visions


def _export_gguf_artifacts(checkpoint: Checkpoint, stage: Path, gguf_types: Sequence[str],
                           max_length: int) -> list[dict[str, Any]]:
    """Text GGUFs (``role`` model, ``mmproj`` = bundle path of their pair) and mmprojs."""
    from qwen3emb.export.gguf_vl import export_vl_gguf

    artifacts = []
    for entry in export_vl_gguf(checkpoint.path, stage / GGUF_DIR, gguf_types,
                                max_length=max_length):
        path = stage / GGUF_DIR / entry.pop("path")
        if "mmproj" in entry:
            entry["mmproj"] = f"{GGUF_DIR}/{entry['mmproj']}"
        artifacts.append(file_entry(stage, path, **entry))
    return artifacts


def _gguf_facts() -> dict[str, Any]:
    """How llama.cpp must be run to reproduce the reference (docs/gguf.md)."""
    return {
        "text_architecture": "qwen3vl",
        "projector_type": "qwen3vl_merger",
        "pooling": "last (the prompt's final newline; no end token appended)",
        "image_min_tokens": VL_MIN_PIXELS // 1024,
        "image_max_tokens": VL_MAX_PIXELS // 1024,
        "note": "llama.cpp ignores clip.vision.image_{min,max}_pixels for this projector; "
                "pass --image-min-tokens / --image-max-tokens (mtmd_context_params)",
        "resize": "reference resize (qwen-vl-utils smart_resize, Pillow BICUBIC) on the host; "
                  "llama.cpp's own resize differs (see reports/parity.md)",
        "video": "not supported by the GGUF runtime",
    }


def _validate_vl_into(stage: Path, checkpoint: Path, manifest: dict[str, Any],
                      backbone: Any) -> Any:
    from qwen3emb.validate.vl import validate_vl_bundle

    report = validate_vl_bundle(stage, checkpoint, model=backbone)
    record_parity(stage, manifest, report, key="artifact")
    return report
