"""What the int8/int4 search scores a build on: the minimum cosine (embedding graphs) or the
largest |score difference| (reranker graphs) over the calibration texts, alone and in padded
batches, against the fp32 graph's outputs kept by calibration."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3emb.constants import (
    ATTENTION_MASK,
    FLOORS,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    SCORE,
    SCORE_FLOORS,
)

TARGETS: dict[str, float] = {"int8": 0.998, "int4": 0.96}
"""Calibration min cosine each precision aims for (its floor plus a margin)."""
SCORE_TARGETS: dict[str, float] = {"int8": 0.01, "int4": 0.025}
"""A reranker's aim: largest |score difference| on the calibration pairs, half its floor
(:data:`qwen3emb.constants.SCORE_FLOORS`)."""


@dataclass(frozen=True)
class Metric:
    """What the search scores a build on. Internally higher is better: cosine as it is, a
    reranker's largest |score difference| d as ``1 - d``."""

    name: str
    """``cosine`` (embedding graphs) or ``score`` (reranker graphs)."""

    @property
    def label(self) -> str:
        return "min cosine" if self.name == "cosine" else "max |score diff|"

    @property
    def key(self) -> str:
        return ("calibration_min_cosine" if self.name == "cosine"
                else "calibration_max_score_diff")

    def shown(self, fidelity: float) -> float:
        """The figure as reported: the cosine, or the score difference."""
        return fidelity if self.name == "cosine" else round(1.0 - fidelity, 9)

    def target(self, precision: str, override: float | None = None) -> float:
        if self.name == "cosine":
            return override or TARGETS[precision]
        return 1.0 - (SCORE_TARGETS[precision] if override is None else override)

    def floor(self, precision: str) -> float:
        return FLOORS[precision] if self.name == "cosine" else 1.0 - SCORE_FLOORS[precision]


COSINE = Metric("cosine")
SCORE_BATCH = 8
"""Batch of the padded scoring feeds (the validator's and the runtime's default batch)."""


def scoring_feeds(feeds: Sequence[dict[str, np.ndarray]], batch: int = SCORE_BATCH
                  ) -> list[tuple[dict[str, np.ndarray], list[int]]]:
    """Each calibration feed alone, and, for token graphs, the feeds in padded batches of
    ``batch`` (left and right padding), as the runtime and the validator run them: dynamic
    activation scales are taken per call, so a text's fidelity depends on its batch-mates.

    Returns:
        ``(feed, indices of the calibration texts in its rows)`` pairs.
    """
    out = [(feed, [i]) for i, feed in enumerate(feeds)]
    if not feeds or set(feeds[0]) != {INPUT_IDS, ATTENTION_MASK}:
        return out
    # Each batch mixes short and long texts, so padding takes a large share of some rows.
    by_length = sorted(range(len(feeds)), key=lambda i: feeds[i][INPUT_IDS].shape[1])
    count = -(-len(feeds) // batch)
    groups = [by_length[g::count] for g in range(count)]
    for side in ("left", "right"):
        for group in groups:
            width = max(feeds[i][INPUT_IDS].shape[1] for i in group)
            ids = np.zeros((len(group), width), np.int64)
            mask = np.zeros((len(group), width), np.int64)
            for row, i in enumerate(group):
                text = feeds[i][INPUT_IDS][0]
                ids[row] = text[-1]  # the end token, which is also the pad token
                span = slice(width - len(text), width) if side == "left" else slice(0, len(text))
                ids[row, span] = text
                mask[row, span] = 1
            out.append(({INPUT_IDS: ids, ATTENTION_MASK: mask}, group))
    return out


def score(path: Path, feeds: Sequence[tuple[dict[str, np.ndarray], list[int]]],
          reference: Sequence[dict[str, np.ndarray]], metric: Metric = COSINE) -> float:
    """Minimum cosine, over feeds and output rows, of the graph at ``path`` to ``reference``;
    with the ``score`` metric, 1 minus the largest |score difference| instead.

    Args:
        path: the graph to score.
        feeds: from :func:`scoring_feeds`.
        reference: the fp32 graph's outputs per calibration text.
        metric: :class:`Metric`.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    # last_hidden_state (interop) is the embedding broadcast over the sequence: nothing to add.
    names = [o.name for o in session.get_outputs()
             if o.name in reference[0] and o.name != LAST_HIDDEN_STATE]
    if metric.name == "score":
        names = [SCORE]
    worst = 1.0
    for feed, rows in feeds:
        wanted = {i.name: feed[i.name] for i in session.get_inputs()}
        for name, value in zip(names, session.run(names, wanted)):
            if metric.name == "score":
                expected = np.concatenate([reference[i][name] for i in rows])
                gap = np.abs(np.nan_to_num(value.astype(np.float64), nan=np.inf) - expected)
                worst = min(worst, 1.0 - float(gap.max()))
                continue
            expected = np.concatenate([reference[i][name] for i in rows])
            a = np.nan_to_num(value.reshape(-1, value.shape[-1]).astype(np.float64))
            b = expected.reshape(-1, value.shape[-1]).astype(np.float64)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1)
                                              * np.linalg.norm(b, axis=1), 1e-30)
            worst = min(worst, float(cos.min()))
    return worst
