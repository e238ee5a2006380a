"""Opt-in progress bars (lazy tqdm) and the peak-memory figure for summaries."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def progress_default() -> bool:
    """Bars only for a person at a terminal: off in CI and when stderr is not a TTY."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


@contextmanager
def bar(total: int | None, desc: str, enabled: bool, unit: str = "it") -> Iterator[Any]:
    """A tqdm bar on stderr when ``enabled``; otherwise an object whose methods do nothing."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm

    handle = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True,
                  dynamic_ncols=True)
    try:
        yield handle
    finally:
        handle.close()
