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
