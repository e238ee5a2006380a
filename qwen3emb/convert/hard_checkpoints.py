"""Hard random-weight Qwen3 checkpoints: the numeric traits that break naive int8 / int4.

Random weights are kind to quantizers; real checkpoints are not. Each fixture here plants one
trait of real models into a random checkpoint in the normal Hugging Face layout (built by
:func:`qwen3emb.convert.random_checkpoint.build_random_checkpoint`), so the exporter's
fidelity machinery is tested against what it will meet, not tuned to one case:

- ``outlier-embeddings``: a few token-embedding columns ~1000x the others (a block-quantized
  table then rounds every ordinary channel sharing a block with one of them to zero);
- ``massive-activations``: a layer's MLP maps a direction every token carries onto one or two
  residual channels of several thousand, which later layers carry on (as in real LLMs, where
  "massive activations" appear after the first few layers); later norms give those channels a
  small gain and scale the rest back up, as trained models do;
- ``deep-high-variance``: weights N(0, 0.1) at width 64 over 28 layers, a stack whose small
  per-MatMul errors compound over depth. Chosen to behave like N(0, 0.05) in the real 0.6B
  shape (measured on the fixed recipes' graphs, calibration texts): fixed int8 0.984 (0.962
  on the real shape), int4 0.71 (0.58), 8-bit block weights 0.997 (llama.cpp q8_0: 0.992).
  The gain-matched std (0.2 at width 64) is far more chaotic than the real shape (8-bit
  weight-only 0.974), width 128 at 0.1 too (0.990);
- ``normal``: the plain random checkpoint.

The real-shape variant of ``deep-high-variance`` is
``write_random_shards(out, preset="0.6B", initializer_range=0.05)`` (``scripts/fidelity.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qwen3emb.errors import InputError

logger = logging.getLogger(__name__)

FIXTURES: tuple[str, ...] = ("outlier-embeddings", "massive-activations", "deep-high-variance",
                             "normal")
EMBEDDING_OUTLIER_COLUMNS = (3, 29, 45)
EMBEDDING_OUTLIER_FACTOR = 1000.0
MASSIVE_LAYER = 2
MASSIVE_CHANNELS = (7, 50)
MASSIVE_MAGNITUDE = 2000.0
STEADY_CHANNEL = 0
STEADY_VALUE = 0.1
FEATURE_GAIN = 20.0
TYPICAL_RMS = 0.03
HIGH_VARIANCE_STD = 0.1
HIGH_VARIANCE_LAYERS = 28


def plant_embedding_outliers(model: Any, columns: tuple[int, ...] = EMBEDDING_OUTLIER_COLUMNS,
                             factor: float = EMBEDDING_OUTLIER_FACTOR) -> None:
    """Multiply a few columns of the token-embedding table by ``factor``.

    Every norm then keeps those channels small (:func:`compensate_norms`), as a trained model
    would, so the ordinary channels carry the meaning.
    """
    import torch

    with torch.no_grad():
        table = model.embed_tokens.weight
        typical = float(table.std())
        table[:, list(columns)] *= factor
    hidden = model.config.hidden_size
    compensate_norms(model, list(columns), factor * typical * (len(columns) / hidden) ** 0.5, 0)


def plant_massive_activations(model: Any, layer: int = MASSIVE_LAYER,
                              channels: tuple[int, ...] = MASSIVE_CHANNELS,
                              magnitude: float = MASSIVE_MAGNITUDE) -> None:
    """Make layer ``layer``'s MLP write ~``magnitude`` into residual ``channels`` for every token.

    Every token carries a small steady embedding channel (the "common direction"); a few MLP
    units of ``layer`` read it and ``down_proj`` maps them onto ``channels``. The planted
    down_proj entries are then rescaled from one forward pass so the channels reach
    ``magnitude``. Later norms give the massive channels a gain of ``FEATURE_GAIN`` over a
    typical channel (the projections absorb it) and scale the ordinary channels back up, so
    the fp32 model stays finite and its embeddings distinct.
    """
    import torch

    hidden = model.config.hidden_size
    huge = list(channels)
    mlp = model.layers[layer].mlp
    with torch.no_grad():
        model.embed_tokens.weight[:, STEADY_CHANNEL] = STEADY_VALUE
        for i, channel in enumerate(huge):
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[i] = 0
                proj.weight[i, STEADY_CHANNEL] = 2.0
            mlp.down_proj.weight[:, i] = 0
            mlp.down_proj.weight[channel] = 0
            mlp.down_proj.weight[channel, i] = (-1) ** i
        ids = torch.randint(0, model.config.vocab_size, (4, 16),
                            generator=torch.Generator().manual_seed(0))
        reached = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
        for i, channel in enumerate(huge):
            mlp.down_proj.weight[channel, i] *= magnitude / float(
                reached[..., channel].abs().mean())
        compensate_norms(model, huge, magnitude * (len(huge) / hidden) ** 0.5, layer + 1)


def compensate_norms(model: Any, huge: list[int], rms: float, first_layer: int) -> None:
    """Give ``huge`` residual channels a small gain in every norm from ``first_layer`` on.

    Trained models whose residual stream carries a few huge channels have norm weights that
    keep them from swamping the rest: the ordinary channels are scaled back up (the stream's
    ``rms`` is set by the huge ones), the huge ones get ``FEATURE_GAIN`` x a typical channel
    and the projections they feed absorb that gain. The final norm keeps them small, so the
    embeddings depend on the ordinary channels (and a quantizer that loses those fails).
    """
    import torch

    hidden = model.config.hidden_size
    ordinary = [j for j in range(hidden) if j not in huge and j != STEADY_CHANNEL]
    with torch.no_grad():
        for later in model.layers[first_layer:]:
            attn, ffn = later.self_attn, later.mlp
            for norm, projections in ((later.input_layernorm, (attn.q_proj, attn.k_proj,
                                                               attn.v_proj)),
                                      (later.post_attention_layernorm, (ffn.gate_proj,
                                                                        ffn.up_proj))):
                norm.weight[ordinary] *= rms / TYPICAL_RMS
                norm.weight[huge] = FEATURE_GAIN / (hidden / len(huge)) ** 0.5
                for projection in projections:
                    projection.weight[:, huge] /= FEATURE_GAIN
        model.norm.weight[ordinary] *= rms / TYPICAL_RMS
        model.norm.weight[huge] = 0.3 / (hidden / len(huge)) ** 0.5
        model.norm.weight[STEADY_CHANNEL] = 0.01


def build_hard_checkpoint(out_dir: str | Path, kind: str, *, preset: str = "tiny",
                          seed: int = 0, reranker: bool = False, tied: bool = False,
                          **config_overrides: Any) -> Path:
    """Write one of :data:`FIXTURES` as a random checkpoint in the Hugging Face layout.

    Args:
        out_dir: target directory (created).
        kind: a name from :data:`FIXTURES`.
        preset: the width (``tiny`` keeps tests fast; depth comes from ``num_hidden_layers``).
        seed: torch seed.
        reranker: write a Qwen3-Reranker (a causal LM with its head,
            :func:`qwen3emb.convert.random_checkpoint.build_random_reranker`) with the trait.
        tied: the reranker's head is the embedding table (as in the released 0.6B).
        **config_overrides: any config.json key (``num_hidden_layers`` ...).

    Returns:
        The checkpoint directory.

    Raises:
        InputError: an unknown fixture name.
    """
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint, build_random_reranker

    if kind not in FIXTURES:
        raise InputError(f"unknown fixture '{kind}'", hint=f"Choose one of {', '.join(FIXTURES)}")
    modify: Any = None
    options: dict[str, Any] = {}
    if kind == "outlier-embeddings":
        modify = plant_embedding_outliers
        options["num_hidden_layers"] = 3
    elif kind == "massive-activations":
        modify = plant_massive_activations
        options["num_hidden_layers"] = MASSIVE_LAYER + 3
    elif kind == "deep-high-variance":
        options.update(num_hidden_layers=HIGH_VARIANCE_LAYERS,
                       initializer_range=HIGH_VARIANCE_STD)
    options.update(config_overrides)
    if reranker:
        return build_random_reranker(out_dir, preset=preset, seed=seed, modify=modify,
                                     tied=tied, **options)
    return build_random_checkpoint(out_dir, preset=preset, seed=seed, modify=modify, **options)
