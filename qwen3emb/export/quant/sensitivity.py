"""Measure what each quantized tensor costs: weight MatMuls and the embedding table.

For every weight MatMul, the calibration run (:func:`calibrate.calibrate` with ``observe``)
keeps a few rows of its fp32 input per calibration text and that text's per-channel range.
:func:`measure_matmuls` then reads each weight once and simulates, in numpy, each treatment
the exporter can give it (``planned.TIERS``): the relative error of the MatMul's *output* on
those rows, the figure that ranks MatMuls by sensitivity. The simulations follow onnxruntime's
arithmetic closely (uint8 asymmetric ``DynamicQuantizeLinear`` scales per call, symmetric
per-column int8 weights; symmetric block-wise n-bit weights, with int8 activations per K-block
for ``accuracy_level`` 4) but not bit for bit: they rank, the whole-graph score decides.

:func:`measure_embedding` finds the token-embedding columns whose size would make their
8-bit blocks round everything else to zero, and the per-column error with and without
keeping them apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

ROWS_PER_TEXT = 16
"""Input rows kept per calibration text and MatMul input (evenly spaced, the last included)."""
EMBEDDING_OUTLIER_RATIO = 8.0
"""An embedding column is an outlier when its max |value| exceeds this x the median column's."""
EMBEDDING_MAX_SIDE_FRACTION = 1 / 16
"""At most this fraction of the columns goes to the fp32 side table."""
EMBEDDING_CHUNK_ROWS = 16384
MEASURE_COLUMNS = 1024
"""A wider MatMul is measured on this many of its output columns: every treatment quantizes
weights per column (or per K-block of a column) and activations independently of the columns,
so a column's error is the same measured alone; an 8B ``down_proj`` then costs what a 0.6B one
does."""
MEASURE_TOP_COLUMNS = 64
"""Of those, the columns with the largest exact outputs are always measured (a massive
activation lives in a few of them); the rest are a seeded random sample, scaled up."""


@dataclass
class ActivationSamples:
    """Rows of each weight-MatMul input, and each text's channel range (for per-call scales)."""

    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    feeds: dict[str, list[int]] = field(default_factory=dict)
    channel_max: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    channel_min: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)

    def observe(self, name: str, value: np.ndarray, feed: int) -> None:
        """Keep ``ROWS_PER_TEXT`` rows of ``value`` and its per-channel max and min."""
        flat = value.reshape(-1, value.shape[-1]).astype(np.float32)
        picks = np.unique(np.linspace(0, len(flat) - 1, min(ROWS_PER_TEXT, len(flat))
                                      ).round().astype(int))
        self.rows.setdefault(name, []).append(flat[picks])
        self.feeds.setdefault(name, []).extend([feed] * len(picks))
        self.channel_max.setdefault(name, {})[feed] = flat.max(axis=0)
        self.channel_min.setdefault(name, {})[feed] = flat.min(axis=0)

    def inputs(self, name: str, factors: np.ndarray | None, batch: int = 8
               ) -> tuple[np.ndarray, np.ndarray]:
        """The sampled rows of ``name`` (divided by smoothing ``factors``) and, per row, the
        ``(min, max)`` that ``DynamicQuantizeLinear`` sees on a batch of ``batch`` texts
        holding that row's text (the texts in calibration order)."""
        x = np.concatenate(self.rows[name])
        s = np.ones(x.shape[1], np.float32) if factors is None else factors
        bounds: dict[int, tuple[float, float]] = {}
        for feed, high in self.channel_max[name].items():
            low = self.channel_min[name][feed]
            # A batch's scale covers all its texts: use the range of the text's batch.
            group = feed // batch
            old = bounds.get(group, (0.0, 0.0))
            bounds[group] = (min(old[0], float((low / s).min())),
                             max(old[1], float((high / s).max())))
        per_row = np.asarray([bounds[f // batch] for f in self.feeds[name]], np.float32)
        return x / s, per_row


# --- simulated treatments ------------------------------------------------------------------


def dynamic_int8_inputs(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """``x`` after uint8 ``DynamicQuantizeLinear`` with its text's (min, max), dequantized."""
    low, high = bounds[:, :1], bounds[:, 1:]
    scale = np.maximum(high - low, 1e-12) / 255.0
    zero = np.clip(np.rint(-low / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def int8_columns(w: np.ndarray) -> np.ndarray:
    """``w`` after symmetric per-column int8, dequantized."""
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
    return np.clip(np.rint(w / scale), -127, 127) * scale


def _blocks(a: np.ndarray, block: int, axis: int) -> tuple[np.ndarray, int]:
    """``a`` padded along ``axis`` to whole blocks, as ``[..., blocks, block, ...]``."""
    size = a.shape[axis]
    pad = -size % block
    if pad:
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        a = np.pad(a, widths)
    shape = list(a.shape)
    shape[axis:axis + 1] = [shape[axis] // block, block]
    return a.reshape(shape), size


def nbits_blocks(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """``w [K, N]`` after symmetric ``bits``-bit quantization in blocks along K, dequantized."""
    levels = (1 << (bits - 1)) - 1
    blocked, size = _blocks(w, block, 0)  # [K/b, b, N]
    scale = np.maximum(np.abs(blocked).max(axis=1, keepdims=True), 1e-12) / levels
    out = np.clip(np.rint(blocked / scale), -levels - 1, levels) * scale
    return out.reshape(-1, w.shape[1])[:size]


def int8_row_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """``x [R, K]`` after symmetric int8 per row and K-block (MatMulNBits accuracy level 4)."""
    blocked, size = _blocks(x, block, 1)  # [R, K/b, b]
    scale = np.maximum(np.abs(blocked).max(axis=2, keepdims=True), 1e-12) / 127.0
    return (np.clip(np.rint(blocked / scale), -127, 127) * scale).reshape(len(x), -1)[:, :size]


def simulate(tier: str, x: np.ndarray, bounds: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The output of one MatMul treated as ``tier`` (a name of ``planned.TIERS``)."""
    from qwen3emb.export.quant.planned import TIERS

    t = TIERS[tier]
    if t.kind == "fp32":
        return x @ w
    if t.kind == "dynamic" and t.per_row:
        rows = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30)
        fixed = np.tile(np.asarray([-1.0, 1.0], np.float32), (len(x), 1))  # rows span [-1, 1]
        return (dynamic_int8_inputs(x / rows, fixed) * rows) @ int8_columns(w)
    if t.kind == "dynamic":
        return dynamic_int8_inputs(x, bounds) @ int8_columns(w)
    xq = int8_row_blocks(x, t.block_size) if t.accuracy_level == 4 else x
    return xq @ nbits_blocks(w, t.bits, t.block_size)


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / max(float(np.linalg.norm(exact)), 1e-30))


def measure_matmul(x: np.ndarray, bounds: np.ndarray, w: np.ndarray, tiers: Iterable[str]
                   ) -> dict[str, float]:
    """Relative output error of one MatMul under each of ``tiers`` on the sampled rows.

    Past :data:`MEASURE_COLUMNS` output columns the error is estimated on a stratified sample
    of them: the :data:`MEASURE_TOP_COLUMNS` largest in full, the others by a random sample
    whose squared error is scaled by the columns it stands for.
    """
    exact = x @ w  # float32: the errors measured are ~1e-2, far above its rounding
    width = w.shape[1]
    if width <= MEASURE_COLUMNS:
        return {tier: relative_error(simulate(tier, x, bounds, w), exact) for tier in tiers}
    energy = (exact.astype(np.float64) ** 2).sum(axis=0)
    top = np.sort(np.argsort(-energy)[:MEASURE_TOP_COLUMNS])
    rest = np.setdiff1d(np.arange(width), top)
    sample = np.sort(np.random.default_rng(0).choice(rest, MEASURE_COLUMNS - len(top),
                                                      replace=False))
    picked = np.concatenate([top, sample])
    scale = len(rest) / len(sample)
    total = max(float(energy.sum()), 1e-60)
    errors = {}
    for tier in tiers:
        diff = simulate(tier, x, bounds, w[:, picked]) - exact[:, picked]
        per_column = (diff.astype(np.float64) ** 2).sum(axis=0)
        squared = per_column[:len(top)].sum() + scale * per_column[len(top):].sum()
        errors[tier] = float(np.sqrt(squared / total))
    return errors


# --- the embedding table -------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingReport:
    """How the 8-bit block table fares, with and without its outlier columns kept apart."""

    outlier_columns: tuple[int, ...]
    worst_column_error: float
    worst_column_error_kept_apart: float
    median_column_error: float

    def to_dict(self) -> dict[str, object]:
        return {"outlier_columns": list(self.outlier_columns),
                "worst_column_error_8bit_blocks": round(self.worst_column_error, 5),
                "worst_column_error_outliers_apart": round(self.worst_column_error_kept_apart,
                                                           5),
                "median_column_error": round(self.median_column_error, 5)}


def measure_embedding(table: np.ndarray, block_size: int) -> EmbeddingReport:
    """Find outlier columns of a ``[rows, width]`` table and the per-column relative error of
    its 8-bit blocks, with them in place and with them moved to a side table (zero in place).

    Reads the table in chunks of rows, so memory stays a few times one chunk.
    """
    from qwen3emb.export.quant.ops import embedding_blocks

    width = table.shape[1]
    peak = np.abs(table).max(axis=0)
    order = np.argsort(-peak)
    limit = max(1, int(width * EMBEDDING_MAX_SIDE_FRACTION))
    median = max(float(np.median(peak)), 1e-12)
    outliers = tuple(sorted(int(c) for c in order[:limit]
                            if peak[c] > EMBEDDING_OUTLIER_RATIO * median))
    err = np.zeros((2, width))
    norm = np.zeros(width)
    for start in range(0, len(table), EMBEDDING_CHUNK_ROWS):
        chunk = np.asarray(table[start:start + EMBEDDING_CHUNK_ROWS], np.float32)
        norm += (chunk.astype(np.float64) ** 2).sum(axis=0)
        for i, apart in enumerate(((), outliers)):
            body = chunk.copy()
            body[:, list(apart)] = 0
            codes, scales = embedding_blocks(body, block_size)
            back = (codes.astype(np.float32) - 128).reshape(len(chunk), -1, block_size)
            back = (back * scales[..., None]).reshape(chunk.shape)
            back[:, list(apart)] = chunk[:, list(apart)]
            err[i] += ((back - chunk).astype(np.float64) ** 2).sum(axis=0)
    column = np.sqrt(err / np.maximum(norm, 1e-30))
    return EmbeddingReport(outliers, float(column[0].max()), float(column[1].max()),
                           float(np.median(column[0])))
