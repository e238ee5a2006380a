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
    """Peak resident memory of this process so far.

    On Linux the high-water mark of this process's own memory (``VmHWM``): ``ru_maxrss``
    there also counts the parent's memory at the fork that started it (the copied address
    space is accounted at ``exec``), so a small child of a 4 GB benchmark reads 4 GB.
    Elsewhere ``ru_maxrss`` (macOS reports bytes).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
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
