"""GGUF export of Qwen3-VL-Embedding checkpoints: a ``qwen3vl`` text model plus a ``clip`` mmproj.

llama.cpp runs Qwen3-VL as two files (shared/CONTRACT.md, GGUF): the decoder as architecture
``qwen3vl`` (M-RoPE sections, ``n_deepstack_layers``; its input embedding for image tokens is
the merged visual feature followed by one deepstack feature per deepstack layer) and the
vision tower as an mmproj of projector type ``qwen3vl_merger`` read by libmtmd. Names and keys
are gguf-py's (``MODEL_ARCH.QWEN3VL``, ``MODEL_ARCH.MMPROJ``, ``Keys.ClipVision``); tensors
stream from the safetensors shards one at a time, as for text models.

The embedding prompt ends with ``<|im_start|>assistant\\n`` and its last token is pooled, so
the text GGUF appends no end token (``add_eos_token`` false) and pools LAST.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    VisionProjectorType,
    get_tensor_name_map,
)

from qwen3emb.constants import (
    IM_END_TOKEN,
    VL_IMAGE_MEAN,
    VL_IMAGE_STD,
    VL_MAX_LENGTH,
    VL_MAX_PIXELS,
    VL_MIN_PIXELS,
)
from qwen3emb.errors import CheckpointError, UnsupportedModelError
from qwen3emb.export.gguf.common import (
    GGUF_TYPES,
    DecoderConfig,
    GGUFType,
    _atomic,
    _read_json,
    _storage,
    _Tensor,
    add_decoder_metadata,
    check_types,
    prepare_output,
    write_models,
    write_tensors,
)
from qwen3emb.export.gguf.vocab import GGUFVocab, read_vocab

logger = logging.getLogger(__name__)

TEXT_ARCH = MODEL_ARCH.QWEN3VL
MMPROJ_ARCH = MODEL_ARCH.MMPROJ
PROJECTOR_TYPE = VisionProjectorType.QWEN3VL  # "qwen3vl_merger"
MMPROJ_TYPES = ("f32", "f16")
"""Precisions the projector is written in; a text GGUF other than f32 pairs with f16."""


@dataclass(frozen=True)
class Qwen3VLConfig(DecoderConfig):
    """The config.json keys the two GGUFs need (``text_config`` and ``vision_config``)."""

    mrope_section: tuple[int, ...]
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_heads: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    image_token_id: int
    end_token_id: int
    """``text_config.eos_token_id`` (``<|im_end|>``); recorded, never appended."""

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: Path) -> Qwen3VLConfig:
        """Build from a parsed config.json.

        Raises:
            UnsupportedModelError: not a ``qwen3_vl`` model, or a geometry llama.cpp lacks.
            CheckpointError: a required key is missing.
        """
        if config.get("model_type") != "qwen3_vl":
            raise UnsupportedModelError(
                f"'{where}' has model_type {config.get('model_type')!r}, not 'qwen3_vl'",
                hint="Use export_gguf for Qwen3-Embedding (text) checkpoints")
        text = dict(config.get("text_config") or {})
        vision = dict(config.get("vision_config") or {})
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        try:
            made = cls(
                **DecoderConfig.fields(text),
                mrope_section=tuple(int(x) for x in rope["mrope_section"]),
                vision_depth=int(vision["depth"]),
                vision_hidden_size=int(vision["hidden_size"]),
                vision_intermediate_size=int(vision["intermediate_size"]),
                vision_heads=int(vision["num_heads"]),
                patch_size=int(vision["patch_size"]),
                spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
                temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
                num_position_embeddings=int(vision.get("num_position_embeddings", 2304)),
                deepstack_visual_indexes=tuple(int(i) for i in
                                               vision["deepstack_visual_indexes"]),
                image_token_id=int(config["image_token_id"]),
                end_token_id=int(text.get("eos_token_id") or 151645),
            )
        except KeyError as e:
            raise CheckpointError(f"'{where}' lacks the key {e} for a qwen3_vl model",
                                  hint="Use the checkpoint's original config.json") from e
        # llama.cpp splits the Conv3D patch embedding into two 2-D kernels, one per frame.
        if made.temporal_patch_size != 2:
            raise UnsupportedModelError(
                f"'{where}' has temporal_patch_size {made.temporal_patch_size}; llama.cpp's "
                "qwen3vl_merger projector supports 2", hint="Export this checkpoint to ONNX")
        if len(made.mrope_section) > 4 or sum(made.mrope_section) * 2 != made.head_dim:
            raise UnsupportedModelError(
                f"'{where}' has mrope_section {list(made.mrope_section)} for head_dim "
                f"{made.head_dim}; llama.cpp needs at most 4 sections covering head_dim / 2",
                hint="Export this checkpoint to ONNX")
        return made

    @property
    def image_size(self) -> int:
        """Side in pixels of the learned position table (48 x 16 = 768 for Qwen3-VL)."""
        return math.isqrt(self.num_position_embeddings) * self.patch_size


def export_vl_gguf(checkpoint_dir: Path, out_dir: Path, types: Sequence[str], *,
                   max_length: int | None = None, progress: bool = False
                   ) -> list[dict[str, Any]]:
    """Write ``out_dir/model-<type>.gguf`` per type and the mmproj file(s) they pair with.

    The text model goes in every requested type; the projector in f32 when ``f32`` is
    requested and in f16 for any other type (``mmproj-f32.gguf`` / ``mmproj-f16.gguf``).

    Args:
        checkpoint_dir: a Hugging Face Qwen3-VL-Embedding checkpoint (config.json,
            safetensors, tokenizer.json).
        out_dir: where the files go (created).
        types: names from ``GGUF_TYPES`` (any case): f32, f16, bf16, q8_0, q4_k_m, q5_k_m,
            q6_k.
        max_length: tokens per prompt the runtime allows, stored as ``qwen3emb.max_length``;
            default min(8192, max_position_embeddings).
        progress: show a progress bar per file (needs tqdm).

    Returns:
        One dict per file: the text models in the order of ``types`` (``role`` "model", with
        ``mmproj`` naming their projector file), then the projectors (``role`` "mmproj");
        ``path`` is relative to ``out_dir``, ``kind`` is "gguf".

    Raises:
        InputError: no types, an unknown type, or max_length out of range.
        CheckpointError: missing or unreadable config, weights or tokenizer.json.
        UnsupportedModelError: not a qwen3_vl checkpoint, or a geometry llama.cpp lacks.
        MissingDependencyError: a k-quant was requested without the ``gguf`` extra.
        OutputError: ``out_dir`` cannot be written.
    """
    wanted = check_types(types)
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = Qwen3VLConfig.from_dict(_read_json(checkpoint_dir / "config.json"), checkpoint_dir)
    max_length = prepare_output(out_dir, wanted, config.max_position_embeddings, max_length,
                                default=VL_MAX_LENGTH)
    vocab = read_vocab(checkpoint_dir, config.vocab_size)
    text_tensors, vision_tensors = list_vl_tensors(checkpoint_dir, config)

    def write_text(path: Path, gtype: GGUFType) -> None:
        writer = GGUFWriter(None, MODEL_ARCH_NAMES[TEXT_ARCH])
        _add_text_metadata(writer, gtype, config, vocab, max_length)
        storage = {t.gguf_name: _storage(t, gtype) for t in text_tensors}
        write_tensors(path, writer, text_tensors, storage, desc=f"GGUF {gtype.name}",
                      progress=progress)

    written = write_models(out_dir, wanted, write_text)
    pairs = {t.name: mmproj_type_for(t.name) for t in wanted}
    for name in dict.fromkeys(pairs.values()):
        path = out_dir / f"mmproj-{name}.gguf"
        _atomic(path, lambda tmp, n=name: _write_mmproj(tmp, GGUF_TYPES[n], config,
                                                         vision_tensors, progress))
        written[f"mmproj-{name}"] = path
    entries = [{"path": written[t.name].name, "kind": "gguf", "role": "model",
                "precision": t.name, "scheme": t.scheme,
                "mmproj": f"mmproj-{pairs[t.name]}.gguf"} for t in wanted]
    entries += [{"path": written[f"mmproj-{n}"].name, "kind": "gguf", "role": "mmproj",
                 "precision": n, "scheme": GGUF_TYPES[n].scheme}
                for n in dict.fromkeys(pairs.values())]
    return entries


def mmproj_type_for(text_type: str) -> str:
    """The projector precision a text GGUF of ``text_type`` is paired with."""
    return "f32" if text_type == "f32" else "f16"


# --- tensors ---------------------------------------------------------------------------------

def _split_frame(frame: int) -> Any:
    """One temporal slice of the Conv3D patch kernel [out, C, T, P, P] → [out, C, P, P]."""
    def take(data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(data[:, :, frame])

    return take


def list_vl_tensors(checkpoint_dir: Path, config: Qwen3VLConfig
                    ) -> tuple[list[_Tensor], list[_Tensor]]:
    """Map every checkpoint tensor to its text-GGUF or mmproj name from the headers alone.

    Both layouts are accepted: ``Qwen3VLModel`` (``language_model.*``, ``visual.*``) and
    ``Qwen3VLForConditionalGeneration`` (``model.language_model.*``, ``model.visual.*``);
    ``lm_head`` is skipped (an embedding model outputs hidden states).

    Raises:
        CheckpointError: no weights, an unknown tensor, or shapes that disagree with config.
    """
    from safetensors import safe_open

    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({checkpoint_dir / f for f in _read_json(index)["weight_map"].values()})
    else:
        shards = sorted(checkpoint_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"'{checkpoint_dir}' has no .safetensors weights",
                              hint="Download the checkpoint's model.safetensors")
    text_names = get_tensor_name_map(TEXT_ARCH, config.num_hidden_layers)
    vision_names = get_tensor_name_map(MMPROJ_ARCH, config.vision_depth)
    text: list[_Tensor] = []
    vision: list[_Tensor] = []
    unknown: list[str] = []
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = hf_name.removeprefix("model.")
                shape = tuple(int(d) for d in f.get_slice(hf_name).get_shape())
                if name.startswith("lm_head.") or hf_name.startswith("lm_head."):
                    continue
                if name.startswith("language_model."):
                    mapped = text_names.get_name("model." + name.removeprefix("language_model."),
                                                 try_suffixes=(".weight", ".bias"))
                    if mapped is None:
                        unknown.append(hf_name)
                    else:
                        text.append(_Tensor(hf_name, mapped, shard, shape))
                elif name.startswith("visual."):
                    found = _vision_tensors(hf_name, name, shard, shape, config, vision_names)
                    if found is None:
                        unknown.append(hf_name)
                    else:
                        vision.extend(found)
                else:
                    unknown.append(hf_name)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} tensors have no qwen3vl GGUF name, e.g. {unknown[:3]}",
            hint="This does not look like a Qwen3-VL-Embedding checkpoint")
    embd = next((t for t in text if t.gguf_name == "token_embd.weight"), None)
    if embd is None or embd.shape != (config.vocab_size, config.hidden_size):
        raise CheckpointError(
            f"embed_tokens has shape {embd.shape if embd else None}, config.json says "
            f"({config.vocab_size}, {config.hidden_size})",
            hint="config.json and the weights come from different checkpoints")
    if not any(t.gguf_name.startswith("v.deepstack.") for t in vision) \
            and config.deepstack_visual_indexes:
        raise CheckpointError("the checkpoint has no deepstack merger weights",
                              hint="Use the complete Qwen3-VL checkpoint")
    return text, vision


def _vision_tensors(hf_name: str, name: str, shard: Path, shape: tuple[int, ...],
                    config: Qwen3VLConfig, names: Any) -> list[_Tensor] | None:
    """llama.cpp's mmproj names for one ``visual.*`` tensor (two for the patch kernel)."""
    suffix = name.rsplit(".", 1)[-1]
    parts = name.split(".")
    if name == "visual.patch_embed.proj.weight":
        kernel = (shape[0], shape[1], shape[3], shape[4])
        return [_Tensor(hf_name, "v.patch_embd.weight", shard, kernel, _split_frame(0)),
                _Tensor(hf_name, "v.patch_embd.weight.1", shard, kernel, _split_frame(1))]
    if name == "visual.patch_embed.proj.bias":
        return [_Tensor(hf_name, "v.patch_embd.bias", shard, shape)]
    if parts[1] == "merger":  # linear_fc1/2 → mm.0 / mm.2 (Qwen2-VL's indices); norm → post_ln
        if parts[2] == "norm":
            return [_Tensor(hf_name, f"v.post_ln.{suffix}", shard, shape)]
        index = {"linear_fc1": 0, "linear_fc2": 2}.get(parts[2])
        return None if index is None else [_Tensor(hf_name, f"mm.{index}.{suffix}", shard,
                                                   shape)]
    if parts[1] == "deepstack_merger_list":  # numbered by the vision layer they read
        layer = config.deepstack_visual_indexes[int(parts[2])]
        kind = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}.get(parts[3])
        return None if kind is None else [_Tensor(hf_name, f"v.deepstack.{layer}.{kind}."
                                                  f"{suffix}", shard, shape)]
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    return None if mapped is None else [_Tensor(hf_name, mapped, shard, shape)]


# --- metadata --------------------------------------------------------------------------------

def _add_text_metadata(writer: GGUFWriter, gtype: GGUFType, config: Qwen3VLConfig,
                       vocab: GGUFVocab, max_length: int) -> None:
    add_decoder_metadata(writer, gtype, config, vocab, max_length)
    writer.add_rope_dimension_count(config.head_dim)
    sections = list(config.mrope_section) + [0] * (4 - len(config.mrope_section))
    writer.add_rope_dimension_sections(sections)
    writer.add_num_deepstack_layers(len(config.deepstack_visual_indexes))
    if vocab.tokens[config.end_token_id] != IM_END_TOKEN:
        raise CheckpointError(
            f"token {config.end_token_id} (text_config.eos_token_id) is "
            f"{vocab.tokens[config.end_token_id]!r}, not {IM_END_TOKEN}",
            hint="tokenizer.json and config.json come from different checkpoints")
    writer.add_bos_token_id(vocab.end_id)
    writer.add_eos_token_id(config.end_token_id)
    writer.add_pad_token_id(vocab.end_id)
    # The pooled token is the prompt's own final newline: llama.cpp must add nothing.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _write_mmproj(path: Path, gtype: GGUFType, config: Qwen3VLConfig, tensors: list[_Tensor],
                  progress: bool) -> None:
    writer = GGUFWriter(None, MODEL_ARCH_NAMES[MMPROJ_ARCH])
    writer.add_type("mmproj")
    writer.add_file_type(int(gtype.file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTOR_TYPE)
    writer.add_vision_projection_dim(config.hidden_size)
    writer.add_vision_image_size(config.image_size)
    writer.add_vision_patch_size(config.patch_size)
    writer.add_vision_embedding_length(config.vision_hidden_size)
    writer.add_vision_feed_forward_length(config.vision_intermediate_size)
    writer.add_vision_block_count(config.vision_depth)
    writer.add_vision_head_count(config.vision_heads)
    writer.add_vision_attention_layernorm_eps(1e-6)  # HF's LayerNorm eps in Qwen3-VL vision
    writer.add_vision_image_mean(list(VL_IMAGE_MEAN))
    writer.add_vision_image_std(list(VL_IMAGE_STD))
    writer.add_vision_spatial_merge_size(config.spatial_merge_size)
    writer.add_vision_use_gelu(True)  # gelu_pytorch_tanh
    writer.add_vision_is_deepstack_layers([i in config.deepstack_visual_indexes
                                           for i in range(config.vision_depth)])
    # The released embedder's pixel budget (qwen-vl-utils, factor 32), not llama.cpp's default.
    writer.add_vision_min_pixels(VL_MIN_PIXELS)
    writer.add_vision_max_pixels(VL_MAX_PIXELS)
    storage = {t.gguf_name: _mmproj_storage(t, gtype) for t in tensors}
    write_tensors(path, writer, tensors, storage, desc=f"mmproj {gtype.name}", progress=progress)


def _mmproj_storage(t: _Tensor, gtype: GGUFType) -> GGMLQuantizationType:
    """llama.cpp's converter keeps the learned position table in f32."""
    if t.gguf_name.startswith("v.position_embd"):
        return GGMLQuantizationType.F32
    return _storage(t, gtype)


__all__ = ["MMPROJ_TYPES", "Qwen3VLConfig", "export_vl_gguf", "list_vl_tensors",
           "mmproj_type_for"]
