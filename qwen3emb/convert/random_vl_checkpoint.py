"""Build random-weight Qwen3-VL-Embedding checkpoints in the normal Hugging Face layout.

``config.json`` + ``model.safetensors`` (a ``Qwen3VLModel``: vision tower with deepstack
mergers + text decoder) + ``tokenizer.json`` with the Qwen special tokens at their real ids
(``<|image_pad|>`` = 151655 ...) and no end token appended + ``chat_template.jinja`` +
``preprocessor_config.json``. Geometry is real (patch 16, merge 2, temporal patch 2, learned
48x48 position table, interleaved M-RoPE); only the widths are tiny.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen3emb.constants import (
    END_TOKEN,
    IM_END_TOKEN,
    QWEN_SPECIAL_TOKENS,
    VL_IMAGE_MEAN,
    VL_IMAGE_STD,
    VL_MERGE_SIZE,
    VL_PATCH_SIZE,
    VL_TEMPORAL_PATCH_SIZE,
)
from qwen3emb.convert.random_checkpoint import REAL_VOCAB_SIZE, build_tokenizer

logger = logging.getLogger(__name__)

# Renders what the released Qwen3-VL template renders for content lists (system text, then
# user content in order, vision placeholders as <|vision_start|><|..._pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for content in message.content -%}"
    "{%- if content.type == 'image' or 'image' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content.type == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

VL_PRESETS: dict[str, dict[str, Any]] = {
    # head_dim 32 → 16 rotary frequencies, split t/h/w as [6, 5, 5] (real: 128, [24, 20, 20]).
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  max_position_embeddings=16384, mrope_section=[6, 5, 5]),
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                    deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=2304),
    ),
    # The released Qwen3-VL-Embedding-2B / -8B shapes (config.json of Qwen3-VL-2B/8B).
    "2B": dict(
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=262144, mrope_section=[24, 20, 20]),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                    deepstack_visual_indexes=[5, 11, 17], num_position_embeddings=2304),
    ),
    "8B": dict(
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=262144, mrope_section=[24, 20, 20]),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                    deepstack_visual_indexes=[8, 16, 24], num_position_embeddings=2304),
    ),
}


def make_vl_config(preset: str = "tiny") -> dict[str, Any]:
    """Return a Qwen3-VL ``config.json`` dict for a preset shape."""
    shape = VL_PRESETS[preset]
    text = dict(shape["text"])
    mrope_section = text.pop("mrope_section")
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": REAL_VOCAB_SIZE,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                "mrope_section": mrope_section, "mrope_interleaved": True},
            **text,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "patch_size": VL_PATCH_SIZE,
            "spatial_merge_size": VL_MERGE_SIZE,
            "temporal_patch_size": VL_TEMPORAL_PATCH_SIZE,
            "out_hidden_size": text["hidden_size"],
            **shape["vision"],
        },
    }


def write_processor_files(out: Path) -> None:
    """Write ``chat_template.jinja``, ``preprocessor_config.json`` and a VL tokenizer config."""
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "patch_size": VL_PATCH_SIZE,
        "temporal_patch_size": VL_TEMPORAL_PATCH_SIZE,
        "merge_size": VL_MERGE_SIZE,
        "image_mean": list(VL_IMAGE_MEAN),
        "image_std": list(VL_IMAGE_STD),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2),
                                                  encoding="utf-8")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # As released: the chat and vision tokens are additional special tokens, which the
    # reranker's truncation keeps (tokenizer.all_special_ids).
    config.update(eos_token=IM_END_TOKEN, pad_token=END_TOKEN, padding_side="right",
                  model_max_length=262144,
                  additional_special_tokens=[t for t, special in QWEN_SPECIAL_TOKENS
                                             if special and t != END_TOKEN])
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_random_vl_checkpoint(out_dir: str | Path, *, preset: str = "tiny", seed: int = 0,
                               dtype: str = "bfloat16",
                               modify: Callable[[Any], None] | None = None) -> Path:
    """Write a random-weight Qwen3-VL-Embedding checkpoint.

    Args:
        out_dir: target directory (created).
        preset: a shape from ``VL_PRESETS``.
        seed: torch seed for the weights.
        dtype: stored weight dtype (``bfloat16`` like the released checkpoints, or ``float32``).
        modify: called with the fp32 ``Qwen3VLModel`` before saving (fixtures plant outliers).

    Returns:
        The checkpoint directory.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel

    out = Path(out_dir)
    end_id = build_tokenizer(out, vocab_size=REAL_VOCAB_SIZE, append_end_token=False)
    if end_id + len(QWEN_SPECIAL_TOKENS) != REAL_VOCAB_SIZE:  # pragma: no cover - invariant
        raise RuntimeError("special tokens are not at their real ids")
    write_processor_files(out)
    config = make_vl_config(preset)
    torch.manual_seed(seed)
    model = Qwen3VLModel(Qwen3VLConfig(**config)).eval()
    _jitter(model, modify)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    saved["architectures"] = config["architectures"]
    (out / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    logger.info("wrote random Qwen3-VL %s checkpoint to %s", preset, out)
    return out


def _jitter(model: Any, modify: Callable[[Any], None] | None) -> None:
    """Default init leaves norms at exactly 1 and biases at 0; jitter them so a wrong norm or
    a dropped bias shows up in parity. A larger position table and deepstack scale make their
    contributions visible. Then ``modify`` (fixtures plant outliers)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                param.mul_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.add_(0.02 * torch.randn_like(param))
        model.visual.pos_embed.weight.mul_(4.0)
        for merger in model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.mul_(4.0)
        if modify is not None:
            modify(model)


def build_random_vl_reranker(out_dir: str | Path, *, preset: str = "tiny", tied: bool = True,
                             seed: int = 0, dtype: str = "bfloat16",
                             modify: Callable[[Any], None] | None = None) -> Path:
    """Write a random-weight Qwen3-VL-Reranker checkpoint: a
    ``Qwen3VLForConditionalGeneration`` with its LM head, as released.

    Args:
        out_dir: target directory (created).
        preset: a shape from ``VL_PRESETS``.
        tied: tie the LM head to the embedding table (the released 2B ties; the 8B does not).
        seed: torch seed.
        dtype: stored weight dtype.
        modify: called with the fp32 ``Qwen3VLModel`` before saving.

    Returns:
        The checkpoint directory; "yes" and "no" are single tokens of its tokenizer, and
        their head rows spread the built-in pairs' logits around 0 (as a trained reranker's
        are spread over (0, 1)).
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qwen3emb.constants import (
        RERANK_NO,
        RERANK_YES,
        VL_RERANK_DOCUMENT_PREFIX,
        VL_RERANK_INSTRUCTION,
        VL_RERANK_QUERY_PREFIX,
        VL_RERANK_SYSTEM,
    )
    from qwen3emb.convert._corpus import CORPUS
    from qwen3emb.convert.random_checkpoint import spread_rows
    from qwen3emb.runtime.vl_prompt import render_rerank_prompt

    out = Path(out_dir)
    # "system", "user" and "assistant" are one token each in Qwen's vocabulary, as the
    # released truncation (which keeps the prompt's last five ids) assumes.
    corpus = (*CORPUS, *([RERANK_YES, RERANK_NO, "system", "user", "assistant"] * 40))
    build_tokenizer(out, vocab_size=REAL_VOCAB_SIZE, corpus=corpus, append_end_token=False)
    write_processor_files(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    yes, no = tokenizer.token_to_id(RERANK_YES), tokenizer.token_to_id(RERANK_NO)
    config = {**make_vl_config(preset), "tie_word_embeddings": tied}
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).eval()
    _jitter(model.model, modify)
    with torch.no_grad():
        states = []
        for document in CORPUS[:24]:
            prompt = render_rerank_prompt(
                VL_RERANK_SYSTEM, VL_RERANK_INSTRUCTION,
                VL_RERANK_QUERY_PREFIX + "what does this passage say?",
                VL_RERANK_DOCUMENT_PREFIX + document)
            ids = torch.tensor([tokenizer.encode(prompt).ids])
            states.append(model.model(input_ids=ids).last_hidden_state[0, -1])
        head = model.get_output_embeddings().weight
        head[[yes, no]] = spread_rows(torch.stack(states), head[[yes, no]])
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    saved["architectures"] = ["Qwen3VLForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    logger.info("wrote random Qwen3-VL %s reranker checkpoint (%s head) to %s", preset,
                "tied" if tied else "untied", out)
    return out


def write_random_vl_shards(out_dir: str | Path, *, preset: str = "2B", seed: int = 0,
                           shard_bytes: int = 2 << 30,
                           num_hidden_layers: int | None = None) -> Path:
    """Write a random-weight Qwen3-VL checkpoint of a real shape straight to bf16 shards.

    Never builds the model: the tensor names and shapes come from a meta ``Qwen3VLModel``
    and one tensor is in memory at a time (plus the shard being filled), so a 2B or 8B shape
    is written without holding it. Names carry the ``model.`` prefix of checkpoints saved
    from ``Qwen3VLForConditionalGeneration``, like the released ones.

    Args:
        out_dir: target directory (created).
        preset: a shape from ``VL_PRESETS``.
        seed: torch seed.
        shard_bytes: maximum bytes per shard.
        num_hidden_layers: text decoder depth instead of the preset's.

    Returns:
        The checkpoint directory (config.json, shards, index, tokenizer and processor files).
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel

    out = Path(out_dir)
    build_tokenizer(out, vocab_size=REAL_VOCAB_SIZE, append_end_token=False)
    write_processor_files(out)
    config = make_vl_config(preset)
    if num_hidden_layers is not None:
        config["text_config"]["num_hidden_layers"] = num_hidden_layers
    hf_config = Qwen3VLConfig(**config)
    hf_config.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    saved["architectures"] = config["architectures"]
    (out / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Qwen3VLModel(hf_config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Any] = {}
    size = total_size = 0
    for name, shape in shapes.items():
        if name.endswith("bias"):
            tensor = 0.02 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # norm weights: near 1, jittered so a wrong norm would show
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        tensor = tensor.to(torch.bfloat16)
        if shard and size + tensor.numel() * 2 > shard_bytes:
            written.append(_flush(out, shard, len(written)))
            size = 0
        shard["model." + name] = tensor
        size += tensor.numel() * 2
        total_size += tensor.numel() * 2
    written.append(_flush(out, shard, len(written)))
    weight_map: dict[str, str] = {}
    for i, (path, keys) in enumerate(written, start=1):
        name = (f"model-{i:05d}-of-{len(written):05d}.safetensors" if len(written) > 1
                else "model.safetensors")
        path.rename(out / name)
        weight_map.update({k: name for k in keys})
    if len(written) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2),
                                                          encoding="utf-8")
    logger.info("wrote random Qwen3-VL %s checkpoint (%.2f GB bf16) to %s", preset,
                total_size / 1e9, out)
    return out


def _flush(out: Path, shard: dict[str, Any], count: int) -> tuple[Path, list[str]]:
    """Write ``shard`` under a temporary name (the final ones need the count) and empty it."""
    from safetensors.torch import save_file

    path = out / f".shard-{count:05d}.safetensors"
    save_file(shard, str(path), metadata={"format": "pt"})
    keys = list(shard)
    shard.clear()
    return path, keys
