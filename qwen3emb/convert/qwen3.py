"""Qwen3-Embedding (text): Qwen3 backbone → last real token → optional MRL cut → L2."""

from __future__ import annotations

import logging
from typing import Any

import torch

from qwen3emb.constants import TEXT_MRL_MIN
from qwen3emb.convert import register
from qwen3emb.convert.base import Family
from qwen3emb.convert.pooling import l2_normalize, last_token_pool, position_ids_from_mask
from qwen3emb.errors import CheckpointError

logger = logging.getLogger(__name__)


class Qwen3Embedder(torch.nn.Module):
    """``input_ids``, ``attention_mask`` [batch, seq] → ``sentence_embedding`` [batch, dim].

    Pooling and normalization live in the graph; positions come from the mask, so padding
    side and batch composition do not change an input's embedding.
    """

    def __init__(self, backbone: torch.nn.Module, dimensions: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dimensions = dimensions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return l2_normalize(last_token_pool(hidden, attention_mask), self.dimensions)


class Qwen3Family(Family):
    """Qwen3-Embedding 0.6B / 4B / 8B (``model_type: qwen3``)."""

    model_type = "qwen3"
    modality = "text"
    mrl_min = TEXT_MRL_MIN

    def load_backbone(self, dtype: Any = None) -> torch.nn.Module:
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(
                self.checkpoint.path, dtype=dtype or torch.float32, attn_implementation="sdpa"
            )
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(
                f"transformers could not load '{self.checkpoint.path}': "
                f"{str(e).strip().splitlines()[0][:200]}",
                hint="Check that the checkpoint is complete and is a Qwen3 model",
            ) from e
        return model.eval()

    def _hf_config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.checkpoint.path)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"transformers cannot read config.json in "
                                  f"'{self.checkpoint.path}': {e}",
                                  hint="Check the checkpoint's config.json") from e

    def meta_backbone(self, num_layers: int | None = None) -> torch.nn.Module:
        from transformers import AutoModel

        config = self._hf_config()
        config._attn_implementation = "sdpa"
        if num_layers is not None:
            config.num_hidden_layers = num_layers
            config.layer_types = config.layer_types[:num_layers]
        with torch.device("meta"):
            model = AutoModel.from_config(config, dtype=torch.float32)
        return model.eval()

    def uniform_layers(self) -> bool:
        # Sliding-window layers (use_sliding_window, from max_window_layers on) read another
        # mask than full-attention ones; the released embedders use none.
        return len(set(self._hf_config().layer_types)) == 1

    def host_buffers(self, backbone: Any) -> dict[str, Any]:
        # inv_freq is computed in __init__, so on the meta device it has no values.
        rotary = type(backbone.rotary_emb)(config=backbone.config)
        return {"rotary_emb.inv_freq": rotary.inv_freq.float().numpy()}

    def embedding_module(self, backbone: Any, dimensions: int | None = None) -> torch.nn.Module:
        return Qwen3Embedder(backbone, dimensions).eval()


register("qwen3")(Qwen3Family)
