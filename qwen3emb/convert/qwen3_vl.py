"""Qwen3-VL-Embedding (``model_type: qwen3_vl``): the family's hooks — its two graphs
(``vision``, ``decoder``; torch modules in :mod:`qwen3emb.convert.qwen3_vl_modules`), how they
are traced and streamed, their precisions, the tokenizer's special tokens and the manifest's
vision and prompt facts."""

from __future__ import annotations

import logging
from typing import Any

import torch

from qwen3emb import constants as C
from qwen3emb.constants import VL_MAX_LENGTH, VL_MRL_MIN
from qwen3emb.convert import register
from qwen3emb.convert.base import Family
from qwen3emb.convert.qwen3_vl_modules import VisionEncoder, VLDecoderEmbedder
from qwen3emb.errors import CheckpointError
from qwen3emb.spec import GraphSpec, TensorSpec

logger = logging.getLogger(__name__)


class Qwen3VLFamily(Family):
    """Qwen3-VL-Embedding 2B / 8B (``model_type: qwen3_vl``)."""

    model_type = "qwen3_vl"
    modality = "vision-language"
    mrl_min = VL_MRL_MIN

    def __init__(self, checkpoint: Any) -> None:
        super().__init__(checkpoint)
        self.text_config = dict(self.config.get("text_config") or {})
        self.vision_config = dict(self.config.get("vision_config") or {})
        missing = [k for k in ("hidden_size", "num_hidden_layers")
                   if k not in self.text_config]
        missing += [f"vision_config.{k}" for k in ("hidden_size", "deepstack_visual_indexes",
                                                   "patch_size", "out_hidden_size")
                    if k not in self.vision_config]
        if missing:
            raise CheckpointError(
                f"config.json in '{checkpoint.path}' lacks {missing} for a qwen3_vl model",
                hint="Use the checkpoint's original config.json",
            )

    @property
    def embedding_dim(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def max_positions(self) -> int:
        return int(self.text_config.get("max_position_embeddings", 0)) or 1 << 31

    @property
    def default_max_length(self) -> int:
        # The released embedder truncates at 8192 tokens (shared/CONTRACT.md, step 6).
        return min(VL_MAX_LENGTH, self.max_positions)

    @property
    def num_layers(self) -> int:
        """Depth of the text decoder."""
        return int(self.text_config["num_hidden_layers"])

    @property
    def deepstack_layers(self) -> int:
        return len(self.vision_config["deepstack_visual_indexes"])

    def load_backbone(self, dtype: Any = None) -> torch.nn.Module:
        from transformers import Qwen3VLModel

        try:
            model = Qwen3VLModel.from_pretrained(
                self.checkpoint.path, dtype=dtype or torch.float32, attn_implementation="sdpa"
            )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"transformers could not load '{self.checkpoint.path}' as Qwen3-VL: "
                f"{str(e).strip().splitlines()[0][:200]}",
                hint="Check that the checkpoint is complete and is a Qwen3-VL model",
            ) from e
        return model.eval()

    def meta_backbone(self, num_layers: int | None = None) -> torch.nn.Module:
        """The ``Qwen3VLModel`` of config.json with weightless (meta) parameters, for tracing.

        Args:
            num_layers: keep only the first ``num_layers`` decoder layers (``None`` = all).
        """
        from transformers import AutoConfig, Qwen3VLModel

        try:
            config = AutoConfig.from_pretrained(self.checkpoint.path)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"transformers cannot read config.json in "
                                  f"'{self.checkpoint.path}': {e}",
                                  hint="Check the checkpoint's config.json") from e
        if num_layers is not None:
            config.text_config.num_hidden_layers = num_layers
        with torch.device("meta"):
            model = Qwen3VLModel._from_config(config, attn_implementation="sdpa",
                                              dtype=torch.float32)
        return model.eval()

    def host_buffers(self, backbone: Any) -> dict[str, Any]:
        """Both rotary tables' ``inv_freq``: the vision tower's axial one and the decoder's
        M-RoPE one (computed in ``__init__``, so a meta backbone has no values for them)."""
        vision = backbone.visual.rotary_pos_emb
        text = backbone.language_model.rotary_emb
        with torch.device("cpu"):
            vision = type(vision)(config=vision.config)
            text = type(text)(config=text.config)
        return {"visual.rotary_pos_emb.inv_freq": vision.inv_freq.float().numpy(),
                "language_model.rotary_emb.inv_freq": text.inv_freq.float().numpy()}

    def uniform_layers(self) -> bool:
        # Every Qwen3-VL text layer is full attention (no sliding window, no layer_types).
        return len(set(self.text_config.get("layer_types") or ["full_attention"])) == 1

    def layer_plan(self, graph: str) -> tuple[str, int, int] | None:
        """The decoder adds a deepstack map after each of its first layers (outside them), so
        the first layer that reads the residual stream straight from the previous one is
        the template: ``deepstack_layers + 2`` layers are traced, the last one copied. The
        vision tower (taps at some blocks) is traced whole."""
        if graph != "decoder" or not self.uniform_layers():
            return None
        return "lm.layers", self.deepstack_layers + 1, 0

    def backbone_name(self, graph: str, name: str) -> str:
        """The vision graph holds ``backbone.visual`` as ``visual`` (same names); the decoder
        holds ``backbone.language_model`` as ``lm``. Checkpoints saved from
        ``Qwen3VLForConditionalGeneration`` add ``model.`` (see :meth:`checkpoint_key`)."""
        if graph == "vision":
            return name
        return "language_model." + name.removeprefix("lm.") if name.startswith("lm.") else name

    @property
    def streamable(self) -> bool:
        return True

    def vision_module(self, backbone: Any) -> torch.nn.Module:
        """The vision graph's module."""
        return VisionEncoder(backbone.visual).eval()

    def embedding_module(self, backbone: Any, dimensions: int | None = None) -> torch.nn.Module:
        """The decoder graph's module."""
        return VLDecoderEmbedder(
            backbone.language_model, int(self.config["image_token_id"]),
            int(self.config["video_token_id"]), dimensions,
        ).eval()

    # --- bundle hooks ------------------------------------------------------------------

    # The decoder's int8 / int4 come from the search (the base class's default), starting from
    # smoothquant with per-row int8 activations. The fixed recipes that share one activation scale
    # per call fail the floor when a batch mixes texts with images (the per-item peak of a down_proj
    # input spans 1.0 to 21 across the probes): on the VL outlier fixture, each probe alone / all in
    # one batch (scripts/measure_vl_int8.py at 96508d3), smoothquant 0.99665 / 0.98466, dynamic
    # 0.99626 / 0.98750, mixed (norm-fed MatMuls int8, the others 8-bit weight-only: the default
    # before per-row activations) 0.99957 / 0.99918, per-row int8 on every MatMul 0.99959 / 0.99959:
    # rows never meet, so batching changes nothing.

    VISION_INT8_SCHEME = "dynamic"
    """Where the vision graph's int8 search starts: per-channel int8 on every MatMul, per-row
    activations, no smoothing (inputs with outlier channels fp32)."""

    def graph_quantization(self, graph: str, forced: str | None) -> tuple[str, bool]:
        """Both graphs' int8 / int4 are searched (measured on calibration items, escalated
        until the embedding, or the visual and deepstack outputs, hold); the vision graph
        starts from :data:`VISION_INT8_SCHEME`. A forced ``--int8-scheme`` applies to both,
        unsearched."""
        if graph == "vision" and forced is None:
            return self.VISION_INT8_SCHEME, True
        return super().graph_quantization(graph, forced)

    support_files = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                     "video_preprocessor_config.json")

    interop_tools = ()
    """No other tool loads our Qwen3-VL files as they are: sentence-transformers, fastembed and
    TEI feed ``input_ids``/``attention_mask`` to one graph, not a vision graph plus a decoder
    driven by host preprocessing; transformers.js's own ``qwen3_vl`` expects its split for
    generation (embeddings, vision, decoder with a KV cache); llama-server and Ollama with the
    mmproj GGUF are untested. Use qwen3emb's ``VLEmbedder`` / ``GGUFVLEmbedder``
    (docs/interop.md)."""

    VISION_PRECISIONS = ("fp32", "fp16", "int8", "int4")
    """The vision graph's precisions: each decoder precision pairs with the vision graph of
    the same precision (:meth:`pair_entries`); ``VLEmbedder(vision_precision=...)`` may pair
    them otherwise. For an image the tower does most of the work (784 patches through 24
    blocks for a 448x448 image on the 2B, against 196 visual tokens in the decoder)."""

    def graph_specs(self, dim: int, opset: int) -> tuple[GraphSpec, GraphSpec]:
        """``vision`` (patches → visual + deepstack embeddings) and ``decoder`` graphs."""
        vision = self.vision_config
        patch_dim = (int(vision.get("in_channels", 3)) * int(vision.get("temporal_patch_size", 2))
                     * int(vision["patch_size"]) ** 2)
        hidden, deepstack = self.embedding_dim, self.deepstack_layers
        visual = (
            TensorSpec(C.VISUAL_EMBEDS, "float32", ("visual_tokens", str(hidden))),
            TensorSpec(C.DEEPSTACK_EMBEDS, "float32",
                       (str(deepstack), "visual_tokens", str(hidden))),
        )
        vision_spec = GraphSpec("vision", inputs=(
            TensorSpec(C.PIXEL_PATCHES, "float32", ("groups", "patches", str(patch_dim))),
            TensorSpec(C.POS_EMBED_INDICES, "int64", ("patches", "4")),
            TensorSpec(C.POS_EMBED_WEIGHTS, "float32", ("patches", "4")),
            TensorSpec(C.VISION_POSITION_IDS, "int64", ("patches", "2")),
        ), outputs=visual, opset=opset)
        decoder_spec = GraphSpec("decoder", inputs=(
            TensorSpec(C.INPUT_IDS, "int64", ("batch", "sequence")),
            TensorSpec(C.ATTENTION_MASK, "int64", ("batch", "sequence")),
            TensorSpec(C.MROPE_POSITION_IDS, "int64", ("3", "batch", "sequence")),
            *visual,
        ), outputs=(TensorSpec(C.SENTENCE_EMBEDDING, "float32", ("batch", str(dim))),),
            opset=opset)
        return vision_spec, decoder_spec

    def graph_module(self, backbone: Any, graph: str, dimensions: int | None) -> Any:
        if graph == "vision":
            return self.vision_module(backbone)
        return self.embedding_module(backbone, dimensions)

    def trace_inputs(self, graph: str, spec: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Example sizes avoid 0 and 1 (torch.export specializes them); patches come in 2x2
        # blocks.
        Dim = torch.export.Dim
        generator = torch.Generator().manual_seed(0)
        if graph == "vision":
            groups, patches = 2, 16
            patch_dim = int(spec.inputs[0].axes[2])
            vision: tuple[Any, ...] = (
                torch.randn(groups, patches, patch_dim, generator=generator),
                torch.randint(0, 2304, (patches, 4), generator=generator),
                torch.rand(patches, 4, generator=generator),
                torch.randint(0, 4, (patches, 2), generator=generator))
            per_patch = {0: 4 * Dim("blocks")}
            return vision, {"pixel_patches": {0: Dim("groups"), 1: per_patch[0]},
                             "pos_embed_indices": per_patch, "pos_embed_weights": per_patch,
                             "vision_position_ids": per_patch}
        batch, sequence, visual = 2, 12, 6
        hidden = self.embedding_dim
        ids = torch.randint(0, 1000, (batch, sequence), generator=generator)
        ids[0, 2:5] = int(self.config["image_token_id"])
        ids[1, 3:6] = int(self.config["video_token_id"])
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        example = (ids, mask, torch.arange(sequence).expand(3, batch, sequence).contiguous(),
                   torch.randn(visual, hidden, generator=generator),
                   torch.randn(self.deepstack_layers, visual, hidden, generator=generator))
        b, s, v = Dim("batch"), Dim("sequence"), Dim("visual_tokens", min=0)
        return example, {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s},
                         "position_ids": {1: b, 2: s}, "visual_embeds": {0: v},
                         "deepstack_embeds": {1: v}}

    def graph_precisions(self, graph: str, precisions: list[str]) -> list[str]:
        if graph == "vision":
            return [p for p in precisions if p in self.VISION_PRECISIONS]
        return precisions

    def graph_entry(self, graph: str) -> dict[str, Any]:
        return {"role": "vision", "graph": "vision"} if graph == "vision" else {
            "role": "model", "graph": graph}

    def pair_entries(self, entries: list[dict[str, Any]]) -> None:
        """Each decoder names the vision precision it is validated and run with: its own
        when the bundle has it, else fp32."""
        paired = {e["precision"] for e in entries if e.get("graph") == "vision"}
        for entry in entries:
            if entry.get("graph") == "decoder":
                entry["vision_precision"] = (entry["precision"] if entry["precision"] in paired
                                             else "fp32")

    def check_tokenizer(self, tokenizer: Any) -> dict[str, Any]:
        """The chat and vision tokens must sit at the ids config.json uses."""
        config = self.config
        wanted = {
            C.IMAGE_PAD_TOKEN: config.get("image_token_id"),
            C.VIDEO_PAD_TOKEN: config.get("video_token_id"),
            C.VISION_START_TOKEN: config.get("vision_start_token_id"),
            C.VISION_END_TOKEN: config.get("vision_end_token_id"),
            C.IM_START_TOKEN: None,
        }
        problems = []
        for token, want in wanted.items():
            got = tokenizer.token_to_id(token)
            if got is None or (want is not None and got != int(want)):  # config may lack some
                problems.append(f"{token} is {got}, config.json says {want}")
        if problems:
            raise CheckpointError(
                f"tokenizer.json does not match config.json: {'; '.join(problems)}",
                hint="Use the tokenizer released with the checkpoint")
        tail = tokenizer.encode(C.VL_ASSISTANT_PROMPT).ids
        return {
            "image_token_id": tokenizer.token_to_id(C.IMAGE_PAD_TOKEN),
            "video_token_id": tokenizer.token_to_id(C.VIDEO_PAD_TOKEN),
            "vision_start_token_id": tokenizer.token_to_id(C.VISION_START_TOKEN),
            "vision_end_token_id": tokenizer.token_to_id(C.VISION_END_TOKEN),
            "pooled_token_id": tail[-1],
            "padding_side": "right",
        }

    def manifest_sections(self, out_dim: int, *, onnx: bool, gguf: bool) -> dict[str, Any]:
        return {
            "embedding": {"dim": self.embedding_dim, "output_dim": out_dim,
                          "mrl_min": self.mrl_min, "mrl_max": out_dim, "pooling": C.POOLING,
                          "normalization": C.NORMALIZATION,
                          "pooled_token": "the final newline of '<|im_start|>assistant\\n'"},
            "prompt": {"default_instruction": C.VL_DEFAULT_INSTRUCTION,
                       "instruction_place": "system message; '.' appended unless it ends in "
                                            "punctuation",
                       "content_order": ["video", "image", "text"],
                       "empty_input": C.VL_EMPTY_TEXT,
                       "add_generation_prompt": True},
            "vision": self._vision_facts(),
            **({"gguf": _GGUF_FACTS} if gguf else {}),
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "deepstack_layers": self.deepstack_layers}

    def _vision_facts(self) -> dict[str, Any]:
        vision = self.vision_config
        side = int(round(int(vision.get("num_position_embeddings", 2304)) ** 0.5))
        return {
            "patch_size": int(vision["patch_size"]),
            "merge_size": int(vision.get("spatial_merge_size", 2)),
            "temporal_patch_size": int(vision.get("temporal_patch_size", 2)),
            "position_table_side": side,
            "deepstack_layers": self.deepstack_layers,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "resample": "PIL.BICUBIC",
            "min_pixels": C.VL_MIN_PIXELS,
            "max_pixels": C.VL_MAX_PIXELS,
            "video": {"fps": C.VL_FPS, "max_frames": C.VL_MAX_FRAMES,
                      "min_frames": C.VL_MIN_FRAMES, "frame_factor": C.VL_FRAME_FACTOR,
                      "min_pixels": C.VL_VIDEO_MIN_PIXELS, "max_pixels": C.VL_VIDEO_MAX_PIXELS,
                      "total_pixels": C.VL_VIDEO_TOTAL_PIXELS,
                      "timestamp_format": C.VL_TIMESTAMP_FORMAT},
        }


_GGUF_FACTS = {
    "text_architecture": "qwen3vl",
    "projector_type": "qwen3vl_merger",
    "pooling": "last (the prompt's final newline; no end token appended)",
    "image_min_tokens": C.VL_MIN_PIXELS // 1024,
    "image_max_tokens": C.VL_MAX_PIXELS // 1024,
    "note": "llama.cpp ignores clip.vision.image_{min,max}_pixels for this projector; "
            "pass --image-min-tokens / --image-max-tokens (mtmd_context_params)",
    "resize": "reference resize (qwen-vl-utils smart_resize, Pillow BICUBIC) on the host; "
              "llama.cpp's own resize differs (see reports/parity.md)",
    "video": "not supported by the GGUF runtime",
}
"""How llama.cpp must be run to reproduce the reference (docs/gguf.md)."""


register("qwen3_vl")(Qwen3VLFamily)
