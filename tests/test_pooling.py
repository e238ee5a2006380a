"""Pooling math: last real token and mask-derived positions, for every padding layout."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qwen3emb.convert.pooling import (  # noqa: E402
    l2_normalize,
    last_token_index,
    last_token_pool,
    position_ids_from_mask,
)


def test_last_token_index_handles_left_right_and_mixed_padding() -> None:
    mask = torch.tensor([
        [1, 1, 1, 0, 0],  # right padded
        [0, 0, 1, 1, 1],  # left padded
        [1, 1, 1, 1, 1],  # full
        [0, 1, 1, 0, 0],  # both sides
    ])
    assert last_token_index(mask).tolist() == [2, 4, 4, 2]


def test_positions_count_only_real_tokens() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_last_token_pool_gathers_the_right_rows() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert last_token_pool(hidden, mask).tolist() == [[2.0, 3.0], [10.0, 11.0]]


def test_l2_normalize_cuts_before_normalizing() -> None:
    vec = torch.tensor([[3.0, 4.0, 12.0]])
    out = l2_normalize(vec, dimensions=2)
    assert out.shape == (1, 2)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8]]))


def test_pooled_last_layer_equals_the_full_last_layer(tiny_checkpoint) -> None:
    """Computing only the pooled row in the last layer changes no embedding, for any padding."""
    from qwen3emb.convert import family_for, load_checkpoint
    from qwen3emb.convert.qwen3 import Qwen3Embedder

    backbone = family_for(load_checkpoint(tiny_checkpoint)).load_backbone()
    full = Qwen3Embedder(backbone, pooled_last_layer=False)
    pooled = Qwen3Embedder(backbone)
    assert pooled.pooled_last_layer and not full.pooled_last_layer
    ids = torch.randint(0, 500, (4, 9), generator=torch.Generator().manual_seed(0))
    masks = {
        "none": torch.ones(4, 9, dtype=torch.long),
        "left": torch.tensor([[0] * 3 + [1] * 6, [1] * 9, [0] * 8 + [1], [0] * 5 + [1] * 4]),
        "right": torch.tensor([[1] * 6 + [0] * 3, [1] * 9, [1] + [0] * 8, [1] * 4 + [0] * 5]),
        "both": torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0, 0], [1] * 9, [0, 0, 1] + [0] * 6,
                              [0] * 2 + [1] * 5 + [0] * 2]),
    }
    with torch.no_grad():
        for side, mask in masks.items():
            a, b = full(ids, mask), pooled(ids, mask)
            assert torch.isfinite(b).all(), side
            torch.testing.assert_close(b, a, atol=2e-6, rtol=0, msg=side)
