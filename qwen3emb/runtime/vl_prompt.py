"""The Qwen3-VL-Embedding prompt, its token ids and its 3-axis M-RoPE positions (numpy only).

The released embedder renders ``[system: instruction, user: videos, images, texts]`` with the
chat template and ``add_generation_prompt=True``; the processor then replaces each
``<|image_pad|>`` by one token per merged patch and each video by, per temporal group,
``<{t:.1f} seconds><|vision_start|>`` + pads + ``<|vision_end|>``. The same string is built
here directly, so the runtime needs no Jinja and no transformers.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np

from qwen3emb.constants import (
    IMAGE_PAD_TOKEN,
    VIDEO_PAD_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
    VL_ASSISTANT_PROMPT,
    VL_DEFAULT_INSTRUCTION,
    VL_EMPTY_TEXT,
    VL_TIMESTAMP_FORMAT,
)
from qwen3emb.runtime.vl_vision import VisualInput


def format_instruction(instruction: str | None) -> str:
    """The system text: the default, or ``instruction`` stripped, with a period appended when
    it does not end in punctuation (Unicode category P*)."""
    if instruction is None:
        return VL_DEFAULT_INSTRUCTION
    text = instruction.strip()
    if not text:
        return VL_DEFAULT_INSTRUCTION
    if not unicodedata.category(text[-1]).startswith("P"):
        text += "."
    return text


def item_text(text: str | None, has_visuals: bool) -> str | None:
    """The text an item contributes: ``NULL`` when it has neither text nor visuals (as the
    released code: only a missing text counts as none; an empty string is text)."""
    return VL_EMPTY_TEXT if text is None and not has_visuals else text


def _visual_text(visual: VisualInput) -> str:
    pads = (VIDEO_PAD_TOKEN if visual.kind == "video" else IMAGE_PAD_TOKEN)
    block = VISION_START_TOKEN + pads * visual.tokens_per_group + VISION_END_TOKEN
    if visual.kind == "image":
        return block
    return "".join(VL_TIMESTAMP_FORMAT.format(t=t) + block for t in visual.timestamps)


def render_prompt(instruction: str, visuals: Sequence[VisualInput], text: str | None) -> str:
    """The expanded prompt for one item; ``visuals`` already in videos-then-images order."""
    user = "".join(_visual_text(v) for v in visuals) + (text or "")
    return (f"<|im_start|>system\n{instruction}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n{VL_ASSISTANT_PROMPT}")


def mrope_positions(ids: Sequence[int], visuals: Sequence[VisualInput], *, image_token_id: int,
                    video_token_id: int, merge_size: int = 2) -> np.ndarray:
    """3-axis (t, h, w) positions [3, len(ids)] as transformers' ``get_rope_index`` computes.

    Text tokens advance all three axes together. Each image, and each temporal group of a
    video, is a block of tokens at (start, start + row, start + col) — t stays at ``start``
    because video groups are separated by timestamp text — and moves the start by
    max(rows, cols).
    """
    tokens = np.asarray(ids, dtype=np.int64)
    out = np.zeros((3, len(tokens)), dtype=np.int64)
    groups = [(v.grid[1] // merge_size, v.grid[2] // merge_size)
              for v in visuals for _ in range(v.grid[0])]
    is_visual = (tokens == image_token_id) | (tokens == video_token_id)
    pos, i, g = 0, 0, 0
    while i < len(tokens):
        if not is_visual[i]:
            out[:, i] = pos
            pos += 1
            i += 1
            continue
        rows, cols = groups[g]
        g += 1
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        n = rows * cols
        out[0, i:i + n] = pos
        out[1, i:i + n] = pos + r.reshape(-1)
        out[2, i:i + n] = pos + c.reshape(-1)
        pos += max(rows, cols)
        i += n
    return out


def render_rerank_side(prefix: str, text: str | None, visuals: Sequence[VisualInput]) -> str:
    """One side of a Qwen3-VL-Reranker pair: its prefix (``<Query>:`` or
    ``\\n<Document>:``), then its videos, images and text; ``NULL`` when it has none (an empty
    string is text, as in the released code)."""
    if text is None and not visuals:
        return prefix + VL_EMPTY_TEXT
    return prefix + "".join(_visual_text(v) for v in visuals) + (text or "")


def render_rerank_prompt(system: str, instruction: str, query: str, document: str) -> str:
    """The expanded Qwen3-VL-Reranker prompt of one pair (sides from
    :func:`render_rerank_side`): system message, then ``<Instruct>: {instruction}`` and both
    sides in one user turn, then the generation prompt."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n<Instruct>: {instruction}{query}{document}<|im_end|>\n"
            f"{VL_ASSISTANT_PROMPT}")


def truncate_keeping_special(ids: Sequence[int], max_length: int, special: frozenset[int],
                             tail: int) -> tuple[list[int], bool]:
    """The released reranker's cut: all but the last ``tail`` ids are cut to ``max_length``
    by keeping every id in ``special`` and the first other ids that fit; then the tail.

    Returns:
        The ids, and whether anything was cut.
    """
    body, end = list(ids[:len(ids) - tail]), list(ids[len(ids) - tail:])
    if len(body) <= max_length:
        return [*body, *end], False
    keep = max_length - sum(1 for i in body if i in special)
    out: list[int] = []
    kept = 0
    for i in body:
        if i in special:
            out.append(i)
        elif kept < keep:
            out.append(i)
            kept += 1
    return [*out, *end], True
