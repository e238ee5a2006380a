"""Build random-weight Qwen3 embedding checkpoints in the normal Hugging Face layout.

Used by the demo, the tests and the benchmarks: nothing here downloads anything. A checkpoint
is ``config.json`` + ``model.safetensors`` + tokenizer files (a real byte-level BPE tokenizer
with the Qwen pre-tokenizer and special tokens, appending ``<|endoftext|>``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qwen3emb.constants import END_TOKEN, IM_END_TOKEN, QWEN_SPECIAL_TOKENS
from qwen3emb.convert._corpus import CORPUS
from qwen3emb.errors import InputError

logger = logging.getLogger(__name__)

# The Qwen2/Qwen3 pre-tokenizer split pattern (as in the released tokenizer.json).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

REAL_VOCAB_SIZE = 151669
"""Qwen3-Embedding-0.6B: 151643 BPE tokens + 26 special tokens."""

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to export in seconds; real geometry otherwise (GQA, q/k norms, head_dim).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=1024),
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=2048),
    # Real shapes from shared/CONTRACT.md, for speed and memory figures.
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=32768),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               max_position_embeddings=40960),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               max_position_embeddings=40960),
}


def build_tokenizer(out_dir: Path, *, vocab_size: int | None = None,
                    bpe_size: int = 1000, corpus: Iterable[str] = CORPUS,
                    append_end_token: bool = True) -> int:
    """Train a byte-level BPE tokenizer with Qwen's pre-tokenizer and write it to ``out_dir``.

    Args:
        out_dir: where ``tokenizer.json`` and ``tokenizer_config.json`` go.
        vocab_size: total vocabulary including the 26 special tokens. When larger than the
            trained vocabulary, unreachable filler tokens pad the BPE vocabulary so that the
            special tokens land at their real ids (151643.. for ``REAL_VOCAB_SIZE``).
        bpe_size: the BPE training target.
        corpus: training texts.
        append_end_token: install the post-processor that appends ``<|endoftext|>`` (the
            Qwen3-Embedding text tokenizer); ``False`` gives the Qwen3-VL tokenizer, which
            adds nothing.

    Returns:
        The id of ``<|endoftext|>``.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus) * 4, trainer)
    model = json.loads(tok.to_str())
    vocab: dict[str, int] = model["model"]["vocab"]
    n_special = len(QWEN_SPECIAL_TOKENS)
    target = (vocab_size - n_special) if vocab_size else len(vocab)
    if target < len(vocab):
        raise InputError(
            f"vocab_size {vocab_size} is smaller than the trained vocabulary "
            f"({len(vocab)} + {n_special} special tokens)",
            hint=f"Use vocab_size >= {len(vocab) + n_special}",
        )
    for i in range(len(vocab), target):
        vocab[f"<|filler_{i}|>"] = i  # never produced by any merge
    model["model"]["vocab"] = vocab
    model["added_tokens"] = [
        {"id": target + i, "content": content, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": special}
        for i, (content, special) in enumerate(QWEN_SPECIAL_TOKENS)
    ]
    end_id = target  # <|endoftext|> is the first special token
    if append_end_token:
        model["post_processor"] = json.loads(processors.TemplateProcessing(
            single=f"$A {END_TOKEN}", pair=f"$A {END_TOKEN} $B {END_TOKEN}",
            special_tokens=[(END_TOKEN, end_id)],
        ).__getstate__())
    out_dir.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_str(json.dumps(model)).save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "padding_side": "left",
        "eos_token": IM_END_TOKEN,
        "pad_token": END_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return end_id


def make_config(preset: str = "tiny", *, vocab_size: int, end_id: int,
                **overrides: Any) -> dict[str, Any]:
    """Return a Qwen3 ``config.json`` dict for a preset shape.

    Raises:
        InputError: unknown preset.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset '{preset}'", hint=f"Choose one of {sorted(PRESETS)}")
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": end_id,
        "eos_token_id": end_id,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        **PRESETS[preset],
    }
    config.update(overrides)
    return config


def build_random_checkpoint(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    modify: Callable[[Any], None] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight Qwen3 embedding checkpoint (config, safetensors, tokenizer).

    Args:
        out_dir: target directory (created).
        preset: a shape from ``PRESETS`` ("tiny", "small", "0.6B", "4B", "8B").
        vocab_size: total vocabulary; ``None`` keeps the small trained one, ``REAL_VOCAB_SIZE``
            puts the special tokens at their real ids.
        seed: torch seed for the weights.
        dtype: stored weight dtype, ``bfloat16`` like the released checkpoints, or ``float32``.
        modify: called with the fp32 ``Qwen3Model`` before saving (fixtures plant outliers).
        **config_overrides: any config.json key.

    Returns:
        The checkpoint directory.
    """
    import torch
    from transformers import Qwen3Config, Qwen3Model

    out = Path(out_dir)
    end_id = build_tokenizer(out, vocab_size=vocab_size)
    total_vocab = end_id + len(QWEN_SPECIAL_TOKENS)
    config = make_config(preset, vocab_size=total_vocab, end_id=end_id, **config_overrides)
    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(**config)).eval()
    with torch.no_grad():
        # Default init leaves RMSNorm weights at exactly 1; jitter them so a wrong norm shows.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.mul_(1.0 + 0.1 * torch.randn_like(param))
        if modify is not None:
            modify(model)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    # save_pretrained rewrites config.json from the model class; keep the released layout.
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    saved["architectures"] = config["architectures"]
    (out / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    logger.info("wrote random %s checkpoint to %s", preset, out)
    return out


RERANK_LOGIT_STD = 2.5
"""Spread of a random reranker's yes-minus-no logit over documents. Random head rows would give
every document nearly the same score (the last token's state is mostly the fixed suffix's) and
often one near 0 or 1, where the sigmoid hides any error; real rerankers spread documents over
(0, 1). So the rows are set along the direction in which the documents' states differ most,
centred at logit 0 (the sigmoid's steepest point)."""


def build_random_reranker(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    tied: bool = False,
    append_end_token: bool = False,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    modify: Callable[[Any], None] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight Qwen3-Reranker checkpoint: a ``Qwen3ForCausalLM`` with its head.

    Args:
        out_dir: target directory (created).
        preset: a shape from ``PRESETS``.
        tied: tie the LM head to the embedding table (as the released 0.6B does).
        append_end_token: the tokenizer's post-processor appends ``<|endoftext|>`` (the
            released reranker tokenizers append nothing).
        vocab_size: total vocabulary (``None``: the small trained one).
        seed: torch seed.
        dtype: stored weight dtype.
        modify: called with the fp32 backbone (``Qwen3Model``) before saving.
        **config_overrides: any config.json key.

    Returns:
        The checkpoint directory; "yes" and "no" are single tokens of its tokenizer.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen3emb.constants import RERANK_NO, RERANK_YES

    out = Path(out_dir)
    # Alone on a line, "yes" and "no" become tokens without a leading space, as in Qwen's
    # vocabulary (the answer follows "\n\n").
    corpus = (*CORPUS, *([RERANK_YES, RERANK_NO] * 40))
    end_id = build_tokenizer(out, vocab_size=vocab_size, corpus=corpus,
                             append_end_token=append_end_token)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    yes, no = tokenizer.token_to_id(RERANK_YES), tokenizer.token_to_id(RERANK_NO)
    config = make_config(preset, vocab_size=end_id + len(QWEN_SPECIAL_TOKENS), end_id=end_id,
                         tie_word_embeddings=tied, **config_overrides)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.mul_(1.0 + 0.1 * torch.randn_like(param))
        if modify is not None:
            modify(model.model)
        head = model.get_output_embeddings().weight
        head[[yes, no]] = _spread_rows(model, tokenizer, head[[yes, no]])
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    saved["architectures"] = ["Qwen3ForCausalLM"]
    (out / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    logger.info("wrote random %s reranker checkpoint (%s head) to %s", preset,
                "tied" if tied else "untied", out)
    return out


def _spread_rows(model: Any, tokenizer: Any, rows: Any) -> Any:
    """New "yes"/"no" head rows whose difference spreads the built-in documents' logits
    (:data:`RERANK_LOGIT_STD`, mean 0) and whose mean is the old rows' mean."""
    import torch

    from qwen3emb.constants import (
        RERANK_INSTRUCTION,
        RERANK_PREFIX,
        RERANK_SUFFIX,
        RERANK_TEMPLATE,
    )

    prefix = tokenizer.encode(RERANK_PREFIX, add_special_tokens=False).ids
    suffix = tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False).ids
    states = []
    for document in CORPUS[:24]:
        content = RERANK_TEMPLATE.format(instruction=RERANK_INSTRUCTION, document=document,
                                         query="what does this passage say?")
        ids = torch.tensor([prefix + tokenizer.encode(content).ids + suffix])
        states.append(model.model(input_ids=ids).last_hidden_state[0, -1])
    return spread_rows(torch.stack(states), rows)


def spread_rows(states: Any, rows: Any) -> Any:
    """"yes"/"no" head rows whose difference spreads the logits of final states ``states``
    [n, hidden] (:data:`RERANK_LOGIT_STD`, mean 0), keeping the mean of ``rows`` [2, hidden]."""
    import torch

    hidden = states.double()
    mean = hidden.mean(0)
    direction = torch.linalg.svd(hidden - mean, full_matrices=False).Vh[0]
    direction = direction - (direction @ mean) / (mean @ mean) * mean  # logit 0 at the mean
    direction *= RERANK_LOGIT_STD / float((hidden @ direction).std())
    centre = rows.double().mean(0)
    return torch.stack([centre + direction / 2, centre - direction / 2]).to(rows.dtype)


def qwen3_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor of a Qwen3 embedding checkpoint (no ``model.`` prefix)."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_out, hidden),
            p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
    shapes["norm.weight"] = (hidden,)
    return shapes


def write_random_shards(
    out_dir: str | Path,
    *,
    preset: str = "0.6B",
    vocab_size: int | None = REAL_VOCAB_SIZE,
    seed: int = 0,
    shard_bytes: int = 2 << 30,
    progress: Callable[[str, int], None] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of a real shape straight to bf16 safetensors shards.

    Never builds the model: one tensor is in memory at a time (plus the shard being filled),
    so an 8B checkpoint can be written on a machine that could not hold it in fp32.

    Args:
        out_dir: target directory.
        preset: a shape from ``PRESETS``.
        vocab_size: total vocabulary (default: the real 151669).
        seed: torch seed.
        shard_bytes: maximum bytes per shard.
        progress: called with (tensor name, bytes) after each tensor.
        **config_overrides: any config.json key.

    Returns:
        The checkpoint directory (config.json, shards, index, tokenizer files).
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    end_id = build_tokenizer(out, vocab_size=vocab_size)
    config = make_config(preset, vocab_size=end_id + len(QWEN_SPECIAL_TOKENS), end_id=end_id,
                         **config_overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generator = torch.Generator().manual_seed(seed)
    std = float(config["initializer_range"])
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Any] = {}
    shard_size = total_size = 0

    def flush() -> None:
        # Shards are written as soon as they are full; their final names need the count.
        path = out / f".shard-{len(written):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, shape in qwen3_tensor_shapes(config).items():
        if len(shape) == 1:  # norm weights: near 1, jittered so a wrong norm would show
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator) * std
        tensor = tensor.to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shard and shard_size + nbytes > shard_bytes:
            flush()
            shard_size = 0
        shard[name] = tensor
        shard_size += nbytes
        total_size += nbytes
        if progress is not None:
            progress(name, nbytes)
    flush()
    total = len(written)
    weight_map: dict[str, str] = {}
    for i, (path, keys) in enumerate(written, start=1):
        name = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        path.rename(out / name)
        weight_map.update({k: name for k in keys})
    if total > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2),
                                                          encoding="utf-8")
    logger.info("wrote random %s checkpoint (%d shards) to %s", preset, total, out)
    return out
