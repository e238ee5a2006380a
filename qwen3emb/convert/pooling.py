"""Last-real-token pooling and L2 normalization, as graph-friendly torch ops."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens: 0, 1, 2, ... from each row's first real token.

    So an input's positions, and its embedding, do not depend on the padding side or on the
    longest input in the batch.
    """
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1 in each row (left, right or mixed padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask * positions).argmax(-1)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Gather ``hidden[b, last_real_token(b)]`` → [batch, hidden]."""
    batch = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[batch, last_token_index(attention_mask)]


def l2_normalize(vectors: torch.Tensor, dimensions: int | None = None) -> torch.Tensor:
    """Optionally keep the first ``dimensions`` columns (Matryoshka), then L2-normalize in fp32."""
    if dimensions is not None:
        vectors = vectors[..., :dimensions]
    return torch.nn.functional.normalize(vectors.float(), p=2.0, dim=-1, eps=1e-12)
