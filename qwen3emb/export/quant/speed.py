"""What a variant costs in time, measured at export beside its fidelity (manifest ``speed``).

Each variant and the fp32 graph run the same padded batch of calibration inputs, loaded as the
runtime loads them (``qwen3emb.runtime.session.open_session``: int8 codes on the fastest exact
kernel of this CPU), on :data:`THREADS` threads, best of :data:`RUNS` runs after a warm-up.
The figure is the export machine's: ``scripts/bench.py`` measures against torch and peers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import EXTERNAL_DATA_SUFFIX

logger = logging.getLogger(__name__)

THREADS = 2
RUNS = 2
MAX_FP32_BYTES = 4 << 30
"""Above this the fp32 graph is not loaded to time it (an 8B is 32 GB): speed is left out."""


def graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


TIMING_ELEMENTS = 8 * 128
"""The scoring feed nearest this many input elements is timed (8 texts of ~128 tokens, the
benchmark's main cell): a 7 x 512 batch took 22 s a run on the 0.6B fp32 graph."""


def timing_feed(feeds: Sequence[tuple[dict[str, np.ndarray], list[int]]]
                ) -> dict[str, np.ndarray]:
    """The scoring feed (a padded batch of calibration texts, for token graphs; one image or
    video for a vision tower) nearest :data:`TIMING_ELEMENTS` input elements."""
    def size(feed: dict[str, np.ndarray]) -> int:
        return int(np.prod(next(iter(feed.values())).shape))

    return min((feed for feed, _ in feeds), key=lambda f: abs(size(f) - TIMING_ELEMENTS))


def best_seconds(path: Path, feed: dict[str, np.ndarray], threads: int = THREADS,
                 runs: int = RUNS) -> float:
    import tempfile

    from qwen3emb.runtime.session import open_session

    # The kernel copy of a staged file is thrown away with it, not kept in the user's cache.
    with tempfile.TemporaryDirectory(prefix="qwen3emb-speed-") as cache:
        session = open_session(path, "cpu", threads, kernel_cache=Path(cache))
        return _best(session, feed, runs)


_FP32_SECONDS: dict[tuple[str, int, int, tuple[int, ...]], float] = {}


def fp32_seconds(source: Path, feed: dict[str, np.ndarray]) -> float:
    """:func:`best_seconds` of the fp32 graph, measured once per export: the int8 and int4
    searches and the manifest's figures share it (each load of a 0.6B fp32 graph is ~10 s)."""
    stat = source.stat()
    key = (str(source.resolve()), stat.st_mtime_ns, stat.st_size,
           tuple(next(iter(feed.values())).shape))
    if key not in _FP32_SECONDS:
        _FP32_SECONDS[key] = best_seconds(source, feed)
    return _FP32_SECONDS[key]


def _best(session: Any, feed: dict[str, np.ndarray], runs: int) -> float:
    wanted = {i.name: feed[i.name] for i in session.get_inputs()}
    session.run(None, wanted)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, wanted)
        best = min(best, time.perf_counter() - start)
    return best


def measure_speed(source: Path, variants: Sequence[Path],
                  feeds: Sequence[tuple[dict[str, np.ndarray], list[int]]]
                  ) -> dict[Path, dict[str, Any]]:
    """``speed`` settings per variant: its time, the fp32 graph's, and the ratio.

    Returns an empty mapping (and logs why) when the fp32 graph is too large to time here.
    """
    from qwen3emb.runtime.kernels import int8_kernel

    if not feeds or not variants:
        return {}
    if graph_bytes(source) > MAX_FP32_BYTES:
        logger.info("%s: above %d GB, not timed at export (scripts/bench.py times it)",
                    source.name, MAX_FP32_BYTES >> 30)
        return {}
    feed = timing_feed(feeds)
    shape = "x".join(str(n) for n in next(iter(feed.values())).shape)
    fp32 = fp32_seconds(source, feed)
    out = {}
    for path in variants:
        seconds = best_seconds(path, feed)
        out[path] = {"ms": round(seconds * 1e3, 2), "fp32_ms": round(fp32 * 1e3, 2),
                     "x_fp32": round(fp32 / seconds, 3), "input": shape,
                     "threads": THREADS, "int8_kernel": int8_kernel(),
                     "cpus": os.cpu_count()}
        logger.info("%s: %.1f ms on %s, %.2fx the fp32 graph", path.name, seconds * 1e3,
                    shape, fp32 / seconds)
        if fp32 / seconds < 1.0:
            logger.warning("%s is slower than the fp32 graph on this machine (%.2fx): its "
                           "escalations cost more time than they save", path.name,
                           fp32 / seconds)
    return out
