"""Which plan a search returns: every build is timed as the runtime runs it, and the fastest
plan that reaches the target wins (:func:`choose_plan`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.export.quant import planned


class BuildClock:
    """Times each build as the runtime runs it (:mod:`qwen3emb.export.quant.speed`), against
    the fp32 graph, on the scoring feed nearest 8 x 128 tokens; off (every time ``None``)
    where the fp32 graph is too large to load beside a build (an 8B)."""

    def __init__(self, source: Path,
                 feeds: Sequence[tuple[dict[str, np.ndarray], list[int]]]) -> None:
        from qwen3emb.export.quant import speed

        self.fp32_seconds: float | None = None
        self.feed = speed.timing_feed(feeds) if feeds else None
        if self.feed is not None and speed.graph_bytes(source) <= speed.MAX_FP32_BYTES:
            self.fp32_seconds = speed.fp32_seconds(source, self.feed)

    def time(self, path: Path) -> float | None:
        from qwen3emb.export.quant import speed

        if self.fp32_seconds is None or self.feed is None:
            return None
        return speed.best_seconds(path, self.feed)

    def describe(self) -> dict[str, Any]:
        from qwen3emb.export.quant import speed

        shape = "x".join(str(n) for n in next(iter(self.feed.values())).shape) if self.feed \
            else None
        return {"input": shape, "threads": speed.THREADS,
                "fp32_ms": None if self.fp32_seconds is None
                else round(self.fp32_seconds * 1e3, 1)}


Key = frozenset[tuple[str, str]]


_LADDER_NAMES = {id(planned.SPEED_LADDER): "speed", id(planned.SIZE_LADDER): "size"}


def fast_and_safe(scored: dict[Key, float], timed: dict[Key, float], target: float,
                  floor: float, fp32_seconds: float) -> list[Key]:
    """Plans past halfway from the floor to the target that run faster than fp32."""
    safe = floor + (target - floor) / 2
    return [k for k in scored if scored[k] >= safe and timed.get(k, float("inf")) < fp32_seconds]


def choose_plan(scored: dict[Key, float], timed: dict[Key, float], target: float,
                floor: float, fp32_seconds: float | None) -> Key:
    """The plan a search returns, from every plan it scored (higher fidelity is better).

    1. Plans that reach the target: the fastest (timed), else the most faithful.
    2. None does: the most faithful of those past halfway from the floor to the target that
       run faster than the fp32 graph; a plan slower than fp32 is returned only where no such
       plan exists (then the most faithful; the export warns that it is slow).
    """
    inf = float("inf")
    reached = [k for k in scored if scored[k] >= target]
    if reached:
        return min(reached, key=lambda k: (timed.get(k, inf), -scored[k]))
    if fp32_seconds is not None and (fast := fast_and_safe(scored, timed, target, floor,
                                                          fp32_seconds)):
        return max(fast, key=lambda k: scored[k])
    return max(scored, key=lambda k: scored[k])
