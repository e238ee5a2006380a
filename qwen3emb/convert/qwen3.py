"""Qwen3-Embedding (text): Qwen3 backbone → last real token → optional MRL cut → L2."""

from __future__ import annotations

import logging
from typing import Any

import torch

from qwen3emb.constants import (
    DEFAULT_TASK,
    END_TOKEN,
    NORMALIZATION,
    POOLING,
    QUERY_TEMPLATE,
    TEXT_MRL_MIN,
)
from qwen3emb.convert import register
from qwen3emb.convert.base import Family
from qwen3emb.convert.pooling import (
    l2_normalize,
    last_token_index,
    last_token_pool,
    position_ids_from_mask,
)
from qwen3emb.errors import CheckpointError
from qwen3emb.spec import TextGraphSpec

logger = logging.getLogger(__name__)


class Qwen3Embedder(torch.nn.Module):
    """``input_ids``, ``attention_mask`` [batch, seq] → ``sentence_embedding`` [batch, dim].

    Pooling and normalization live in the graph; positions come from the mask, so padding
    side and batch composition do not change an input's embedding.

    With ``pooled_last_layer`` (the default), the last decoder layer computes keys and values
    for every token but its query, attention output, MLP and the final norm only for the pooled
    token: the other rows of the last layer never reach the embedding. Same result, about
    1/``num_layers`` less work.
    """

    def __init__(self, backbone: torch.nn.Module, dimensions: int | None = None, *,
                 pooled_last_layer: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.dimensions = dimensions
        config: Any = backbone.config
        self.pooled_last_layer = pooled_last_layer and len(set(config.layer_types)) == 1
        # No attention row is empty, so no softmax can produce NaN (see forward).
        self.nan_free_softmax = self.pooled_last_layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.pooled_hidden(input_ids, attention_mask), self.dimensions)

    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                      ) -> torch.Tensor:
        """The final-norm hidden state of each input's last real token → [batch, hidden]."""
        position_ids = position_ids_from_mask(attention_mask)
        if not self.pooled_last_layer:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False).last_hidden_state
            return last_token_pool(hidden, attention_mask)
        from transformers.masking_utils import create_causal_mask

        # Qwen3Model.forward up to its last layer, with the same mask and rotary tables.
        backbone: Any = self.backbone
        hidden = backbone.embed_tokens(input_ids)
        mask: Any = create_causal_mask(config=backbone.config, inputs_embeds=hidden,
                                  attention_mask=attention_mask, past_key_values=None,
                                  position_ids=position_ids)
        if mask is not None:
            # A padding row attends to nothing, and a softmax over nothing is NaN (torch's sdpa
            # export guards every layer with IsNaN/Where for it). Let each row also see itself:
            # real rows already do, and padding rows never reach a real or the pooled row. The
            # exporter then drops the guards (see nan_free_softmax).
            if mask.dtype != torch.bool:
                raise TypeError(f"expected a boolean sdpa mask, got {mask.dtype}")
            seq = torch.arange(mask.shape[-1], device=mask.device)
            mask = mask | (seq[:, None] == seq[None, :])
        rotary = backbone.rotary_emb(hidden, position_ids)
        *body, last = backbone.layers[: backbone.config.num_hidden_layers]
        for layer in body:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary,
                           position_ids=position_ids, use_cache=False)
        # The pooled row is the last real token, so every real key is at or before it: its row
        # of the causal mask is the key mask itself. Read from the [batch, seq] input, not
        # gathered from the [batch, 1, seq, seq] mask, which the blocked attention never needs.
        row_mask = None if mask is None else attention_mask.bool()[:, None, None, :]
        pooled = pooled_layer(last, hidden, row_mask, rotary, last_token_index(attention_mask))
        return backbone.norm(pooled)[:, 0]


def pooled_layer(layer: Any, hidden: torch.Tensor, mask: torch.Tensor | None,
                 rotary: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """A Qwen3 decoder layer's output at row ``index[b]`` of each input → [batch, 1, hidden].

    Keys and values come from every row; the query, o_proj and MLP from the pooled row only.
    ``mask`` is the pooled query's row of the model's causal mask ([batch, 1, 1, seq], or
    ``None`` when nothing is masked). Activations stay 3-D so the projections
    export as MatMul (as in the other layers), not Gemm.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen3.modeling_qwen3 import eager_attention_forward, rotate_half

    attn = layer.self_attn
    batch = torch.arange(hidden.shape[0], device=hidden.device)
    normed = layer.input_layernorm(hidden)
    heads = (*normed.shape[:-1], -1, attn.head_dim)
    key = attn.k_norm(attn.k_proj(normed).view(heads)).transpose(1, 2)
    value = attn.v_proj(normed).view(heads).transpose(1, 2)
    def row_of(x: torch.Tensor) -> torch.Tensor:
        return x[batch, index].unsqueeze(1)  # [batch, 1, hidden]

    row = row_of(normed)
    query = attn.q_norm(attn.q_proj(row).view(row.shape[0], 1, -1, attn.head_dim)).transpose(1, 2)
    cos, sin = rotary  # [batch, seq, head_dim]
    key = key * cos.unsqueeze(1) + rotate_half(key) * sin.unsqueeze(1)
    cos_row, sin_row = cos[batch, index][:, None, None], sin[batch, index][:, None, None]
    query = query * cos_row + rotate_half(query) * sin_row
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                      eager_attention_forward)
    out, _ = interface(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling,
                       sliding_window=attn.sliding_window)
    out = row_of(hidden) + attn.o_proj(out.reshape(out.shape[0], 1, -1))
    return out + layer.mlp(layer.post_attention_layernorm(out))


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

    @property
    def pooled_last_layer(self) -> bool:
        return self.uniform_layers()

    def host_buffers(self, backbone: Any) -> dict[str, Any]:
        # inv_freq is computed in __init__, so on the meta device it has no values.
        rotary = type(backbone.rotary_emb)(config=backbone.config)
        return {"rotary_emb.inv_freq": rotary.inv_freq.float().numpy()}

    def embedding_module(self, backbone: Any, dimensions: int | None = None) -> torch.nn.Module:
        return Qwen3Embedder(backbone, dimensions,
                             pooled_last_layer=self.pooled_last_layer).eval()

    @property
    def streamable(self) -> bool:
        return True

    def graph_specs(self, dim: int, opset: int) -> tuple[TextGraphSpec]:
        return (TextGraphSpec(dim=dim, opset=opset),)

    def trace_inputs(self, graph: str, spec: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Batch 2 (one row left-padded in real use) by 8 tokens; neither dimension is 0 or 1,
        # which torch.export would specialize. Values do not matter: tracing runs on meta.
        ids = torch.zeros((2, 8), dtype=torch.int64)
        mask = torch.ones((2, 8), dtype=torch.int64)
        axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
        return (ids, mask), {"input_ids": axes, "attention_mask": axes}

    def check_tokenizer(self, tokenizer: Any) -> dict[str, Any]:
        """The tokenizer must append ``<|endoftext|>`` and keep it last when truncating."""
        end_id = tokenizer.token_to_id(END_TOKEN)
        if end_id is None:
            raise CheckpointError(f"tokenizer.json has no {END_TOKEN} token",
                                  hint="This is not a Qwen3 tokenizer")
        tokenizer.enable_truncation(max_length=4)
        for text in ("a", "a b c d e f g h i j k l"):
            ids = tokenizer.encode(text).ids
            if not ids or ids[-1] != end_id:
                raise CheckpointError(
                    f"tokenizer.json does not end inputs with {END_TOKEN} (for {text!r} the "
                    f"last id is {ids[-1] if ids else None}, expected {end_id})",
                    hint="Qwen3-Embedding's tokenizer post-processor appends it; use that "
                         "tokenizer",
                )
        return {"end_token": END_TOKEN, "end_token_id": end_id, "pad_token_id": end_id,
                "end_token_rule": (f"the tokenizer's post-processor appends {END_TOKEN}; "
                                   "truncate the text, keep the end token last; pool that "
                                   "token")}

    interop_tools = ("sentence-transformers", "transformers.js", "fastembed", "tei", "llama.cpp",
                     "ollama")

    def prompts(self) -> dict[str, str]:
        """The default query instruction up to the query itself; documents get none."""
        return {"query": QUERY_TEMPLATE.format(task=DEFAULT_TASK, query=""), "document": ""}

    def manifest_sections(self, out_dim: int, *, onnx: bool, gguf: bool) -> dict[str, Any]:
        return {
            "embedding": {"dim": self.embedding_dim, "output_dim": out_dim,
                          "mrl_min": self.mrl_min, "mrl_max": out_dim, "pooling": POOLING,
                          "normalization": NORMALIZATION},
            "prompt": {"query_template": QUERY_TEMPLATE, "default_task": DEFAULT_TASK,
                       "documents": "no instruction"},
        }


register("qwen3")(Qwen3Family)
