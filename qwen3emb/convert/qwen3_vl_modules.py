"""The Qwen3-VL-Embedding graphs as torch modules: vision tower (+ deepstack) and decoder →
last real token → L2.

Two graphs. ``VisionEncoder`` maps the patches of one image, one video or a stack of
same-size images to visual embeddings plus one feature map per deepstack layer.
``VLDecoderEmbedder`` scatters them into the token embeddings at the image/video placeholder
tokens, adds the deepstack maps after the first decoder layers, runs the decoder with 3-axis
M-RoPE positions, and pools the last real token. Shapes that depend on the image grid
(position-table interpolation taps, rotary positions) come from the host as inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from qwen3emb.convert.pooling import l2_normalize, last_token_pool


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionEncoder(torch.nn.Module):
    """``pixel_patches`` [groups, patches, C*T*P*P] → visual embeds + deepstack maps.

    A group is one temporal patch (an image, or two frames of a video); every group has the
    same grid, so attention runs batched over groups, which is what HF's per-frame
    ``cu_seqlens`` split computes. ``pos_embed_indices``/``pos_embed_weights`` [patches, 4]
    are the bilinear taps into the learned position table and ``vision_position_ids``
    [patches, 2] the (row, col) of each patch, all in 2x2 merge-block order.
    """

    visual: Any  # transformers' Qwen3VLVisionModel

    def __init__(self, visual: Any) -> None:
        super().__init__()
        self.visual = visual
        self.deepstack_indexes = list(visual.deepstack_visual_indexes)

    def _attention(self, block: Any, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        groups, patches, width = x.shape
        qkv = attn.qkv(x).reshape(groups, patches, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [groups, heads, patches, head_dim]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        return attn.proj(out.transpose(1, 2).reshape(groups, patches, width))

    def forward(self, pixel_patches: torch.Tensor, pos_embed_indices: torch.Tensor,
                pos_embed_weights: torch.Tensor, vision_position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.visual
        groups, patches, _ = pixel_patches.shape
        x = visual.patch_embed(pixel_patches.reshape(groups * patches, -1))
        width = x.shape[-1]
        pos = (visual.pos_embed(pos_embed_indices) * pos_embed_weights[..., None]).sum(1)
        x = x.reshape(groups, patches, width) + pos
        cos, sin = visual.rotary_pos_emb(x, vision_position_ids)
        deepstack = []
        for layer, block in enumerate(visual.blocks):
            x = x + self._attention(block, block.norm1(x), cos, sin)
            x = x + block.mlp(block.norm2(x))
            if layer in self.deepstack_indexes:
                merger = visual.deepstack_merger_list[self.deepstack_indexes.index(layer)]
                deepstack.append(_merge(merger, x))
        return _merge(visual.merger, x), torch.stack(deepstack)


def _merge(merger: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``Qwen3VLVisionPatchMerger.forward`` on ``x`` [groups, patches, width],
    kept 3-D: on a 2-D input the exporter writes its Linears as ``Gemm``, which the
    quantizers do not see (``ops.weight_matmuls``); as ``MatMul`` they get int8 like the
    blocks' (the four mergers hold ~1/4 of the 2B tower's weights)."""
    hidden = merger.hidden_size
    x = x.reshape(1, -1, hidden) if merger.use_postshuffle_norm else x
    x = merger.norm(x).reshape(1, -1, hidden)
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(x)))[0]


class VLDecoderEmbedder(torch.nn.Module):
    """Token ids + visual features → ``sentence_embedding`` [batch, dim] (last real token, L2).

    Visual rows are consumed in row-major order of the placeholder tokens (image or video
    id) across the batch; ``visual_embeds`` may have zero rows for text-only input.
    """

    lm: Any  # transformers' Qwen3VLTextModel

    def __init__(self, language_model: torch.nn.Module, image_token_id: int,
                 video_token_id: int, dimensions: int | None = None) -> None:
        super().__init__()
        self.lm = language_model
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.dimensions = dimensions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, visual_embeds: torch.Tensor,
                deepstack_embeds: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled_hidden(input_ids, attention_mask, position_ids, visual_embeds,
                                    deepstack_embeds)
        return l2_normalize(pooled, self.dimensions)

    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, visual_embeds: torch.Tensor,
                      deepstack_embeds: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden state of each row's last real token, [batch, hidden]."""
        lm = self.lm
        tokens = lm.embed_tokens(input_ids)
        batch, seq, width = tokens.shape
        is_visual = (input_ids == self.image_token_id) | (input_ids == self.video_token_id)
        flat = is_visual.reshape(-1).to(torch.int64)
        # 1-based row of each placeholder's visual feature; 0 (a zero row) elsewhere.
        row = (flat.cumsum(0) * flat).reshape(batch, seq)
        zero = visual_embeds.new_zeros(1, width)
        visual = torch.cat([zero, visual_embeds], 0)[row]
        hidden = torch.where(is_visual[..., None], visual, tokens)
        stack = torch.cat([deepstack_embeds.new_zeros(deepstack_embeds.shape[0], 1, width),
                           deepstack_embeds], 1)

        keys = attention_mask.to(torch.bool)
        positions = torch.arange(seq, device=input_ids.device)
        causal = positions[None, :] <= positions[:, None]
        mask = causal[None, None] & keys[:, None, None, :]
        cos, sin = lm.rotary_emb(hidden, position_ids)
        for layer, decoder_layer in enumerate(lm.layers):
            hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
            if layer < stack.shape[0]:
                hidden = hidden + stack[layer][row]
        return last_token_pool(lm.norm(hidden), attention_mask)


class VLDecoderScorer(VLDecoderEmbedder):
    """The decoder's inputs → ``score`` [batch] and ``logits`` [batch, 1] (Qwen3-VL-Reranker):
    the pooled final-norm hidden state times ``score_head`` (``lm_head[yes] − lm_head[no]``,
    [hidden, 1]), then the sigmoid."""

    def __init__(self, language_model: torch.nn.Module, image_token_id: int,
                 video_token_id: int, head: torch.Tensor | None = None) -> None:
        super().__init__(language_model, image_token_id, video_token_id)
        hidden = int(language_model.config.hidden_size)
        device = next(language_model.parameters()).device
        weight = (torch.empty((hidden, 1), device=device) if head is None
                  else head.reshape(hidden, 1).float())
        self.score_head = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                position_ids: torch.Tensor, visual_embeds: torch.Tensor,
                deepstack_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooled_hidden(input_ids, attention_mask, position_ids, visual_embeds,
                                    deepstack_embeds)
        logits = pooled.float() @ self.score_head
        return torch.sigmoid(logits)[:, 0], logits
