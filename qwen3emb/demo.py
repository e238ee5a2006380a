"""The built-in default: random checkpoint → export → validate → embed, all offline."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen3emb.errors import OutputError

logger = logging.getLogger(__name__)

MARKER = ".qwen3emb-demo"


@dataclass
class DemoSummary:
    """What the demo did, as lines to print, and whether parity passed."""

    passed: bool
    lines: list[str] = field(default_factory=list)


def run_demo(output: str | Path, *, preset: str = "small") -> DemoSummary:
    """Build a random-weight Qwen3 embedding checkpoint, export it, validate it, embed with it.

    Args:
        output: working directory; gets ``checkpoint/`` and ``bundle/``.
        preset: checkpoint shape (see ``random_checkpoint.PRESETS``).

    Returns:
        A summary with the report path and a few numbers.

    Raises:
        OutputError: ``output`` exists, is not empty and is not a previous demo directory.
    """
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint
    from qwen3emb.pipeline import export_bundle
    from qwen3emb.runtime import TextEmbedder

    root = Path(output)
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise OutputError(f"'{root}' exists and is not a demo directory",
                          hint="Choose an empty or new directory with -o")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by qwen3emb-export demo\n", encoding="utf-8")
    start = time.perf_counter()
    checkpoint = root / "checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    build_random_checkpoint(checkpoint, preset=preset)
    result = export_bundle(checkpoint, root / "bundle", validate=True, force=True)
    report = result.report
    embedder = TextEmbedder(result.bundle)
    queries = embedder.encode_queries(["What is the capital of France?"])
    docs = embedder.encode_documents(["Paris is the capital of France.", "Bananas are yellow."])
    scores = (queries @ docs.T)[0]
    fp32 = report.artifacts[0]
    lines = [
        f"checkpoint: {checkpoint} (random weights, '{preset}' shape, real BPE tokenizer)",
        f"bundle:     {result.bundle}",
        f"parity:     {'PASS' if report.passed else 'FAIL'}; fp32 min cosine "
        f"{fp32.min_cosine:.7f} over {len(fp32.cosines)} probes (floor {fp32.floor})",
        f"report:     {result.bundle / 'reports' / 'parity.md'}",
        f"embed:      query·docs = {scores[0]:.4f}, {scores[1]:.4f} "
        f"(random weights: the numbers mean nothing, the plumbing is real)",
        f"time:       {time.perf_counter() - start:.1f} s",
        f"next:       qwen3emb-export embed {result.bundle} \"hello world\"",
    ]
    return DemoSummary(passed=bool(report.passed), lines=lines)
