#!/usr/bin/env python3
"""Time and peak memory of the ONNX export, streaming vs in-memory, and of building variants.

Each mode runs in its own subprocess so its peak RSS is its own:

    python scripts/bench.py export-cost /tmp/qwen3-0.6b-random --modes stream memory --json out.json
    python scripts/bench.py export-cost /tmp/r06 --modes variants --precisions fp16 int8 int4
    python scripts/bench.py export-cost /tmp/r06 --modes memory --trace full   # trace every layer

``bundle`` is the export as users run it (``qwen3emb-export export CHECKPOINT`` with
``--precision fp32 fp16 int8 int4``, no validation): total time, peak RSS and, from the
export's own log, when each phase ended (seconds from the start).

``variants`` exports fp32 (streamed) in one process, then optimizes, calibrates and writes the
requested precisions from it in a second one, and reports that second process alone.

The target from the large-checkpoint issue: streaming peak RSS <= 1.3 x the largest fp32 tensor
+ 1.5 GB, and faster than the in-memory path.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time
from pathlib import Path
from qwen3emb.convert import family_for, load_checkpoint
from qwen3emb.export.onnx.trace import export_onnx
from qwen3emb.spec import TextGraphSpec
family = family_for(load_checkpoint(sys.argv[1]))
export_onnx(family, Path(sys.argv[2]) / "model.onnx", TextGraphSpec(dim=family.embedding_dim),
            weights=sys.argv[3], trace=sys.argv[4])
"""


VARIANTS_CHILD = """
import sys, time
from pathlib import Path
from qwen3emb.convert import family_for, load_checkpoint
from qwen3emb.export.onnx.trace import export_onnx
from qwen3emb.export.quant.precisions import build_precisions, check_precisions
from qwen3emb.spec import TextGraphSpec
checkpoint, out, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
family = family_for(load_checkpoint(checkpoint))
spec = TextGraphSpec(dim=family.embedding_dim)
if phase == "export":
    export_onnx(family, out / "model.onnx", spec)
else:
    build_precisions(out, out / "model.onnx", spec, check_precisions(sys.argv[4:]),
                     tokenizer_json=checkpoint / "tokenizer.json")
    from qwen3emb.progress import peak_rss_bytes
    print(peak_rss_bytes())  # this process alone, not the export before it
"""


BUNDLE_CHILD = """
import logging, sys, time
from pathlib import Path
start = time.perf_counter()
class Since(logging.Formatter):
    def format(self, record):
        return f"{time.perf_counter() - start:8.1f} {record.getMessage()}"
handler = logging.StreamHandler()
handler.setFormatter(Since())
logging.basicConfig(level=logging.INFO, handlers=[handler])
from qwen3emb.pipeline import export_bundle
export_bundle(Path(sys.argv[1]), Path(sys.argv[2]) / "bundle", validate=False, force=True,
              precisions=sys.argv[3:])
from qwen3emb.progress import peak_rss_bytes
print(peak_rss_bytes())
"""
PHASES = (("fp32 graph written", "optimized graph"), ("fp16 written", "wrote model_fp16"),
          ("calibrated", "calibrated "), ("MatMuls measured", "measured "),
          ("int8 scored", "int8 build"), ("int4 scored", "int4 build"),
          ("int8/int4 timed", "x the fp32 graph"), ("load check", "load check"))
"""Milestones of the export's log: the last line containing each needle ends the phase."""


def measure_bundle(checkpoint: Path, precisions: list[str], keep: Path | None = None
                   ) -> dict[str, object]:
    """The default export of ``checkpoint`` in its own process: time, peak, phase ends; the
    bundle is kept at ``keep`` (else deleted)."""
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", BUNDLE_CHILD, str(checkpoint), out,
                               *precisions], capture_output=True, text=True)
        if keep is not None and proc.returncode == 0:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(Path(out) / "bundle", keep)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"export failed:\n{proc.stderr[-2000:]}")
    phases: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        stamp, _, message = line.strip().partition(" ")
        for label, needle in PHASES:
            if needle in message:
                try:
                    phases[label] = float(stamp)
                except ValueError:
                    pass
    peak = int(proc.stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2),
            "precisions": precisions, "phase_ends_s": phases}


def measure_variants(checkpoint: Path, precisions: list[str]) -> dict[str, object]:
    """Build ``precisions`` from a streamed fp32 export; time and peak of that step alone."""
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as out:
        subprocess.run([sys.executable, "-c", VARIANTS_CHILD, str(checkpoint), out, "export"],
                       capture_output=True, text=True, check=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", VARIANTS_CHILD, str(checkpoint), out,
                               "variants", *precisions], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"building variants failed:\n{proc.stderr[-2000:]}")
        sizes = {p.name: round(p.stat().st_size / 1e9, 3) for p in Path(out).iterdir()}
    peak = int(proc.stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2),
            "precisions": precisions, "files_gb": sizes}


def largest_tensor_bytes(checkpoint: Path) -> int:
    from qwen3emb.convert import load_checkpoint
    from qwen3emb.convert.weights import ShardedWeights

    shards = ShardedWeights(load_checkpoint(checkpoint).weight_files)
    return max(shards.nbytes(k) for k in shards)


def measure(checkpoint: Path, mode: str, trace: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), out, mode, trace],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{mode} export failed:\n{proc.stderr[-2000:]}")
        size = sum(p.stat().st_size for p in Path(out).iterdir())
    # ru_maxrss of the children so far is a running maximum: measure one mode per process.
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak_kb / 1e6, 2),
            "onnx_gb": round(size / 1e9, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--modes", nargs="+", default=["stream", "memory"],
                        choices=["stream", "memory", "variants", "bundle"])
    parser.add_argument("--precisions", nargs="+", default=["fp16", "int8", "int4"],
                        choices=["fp16", "int8", "int4"])
    parser.add_argument("--trace", default="shallow", choices=["shallow", "full"],
                        help="shallow: trace 2 layers and replicate (default); full: all layers")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, default=None,
                        help="bundle mode: keep the exported bundle here (replacing it)")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:  # one mode per process, so RUSAGE_CHILDREN is that mode's peak alone
        if args._one == "bundle":
            print(json.dumps(measure_bundle(args.checkpoint, args.precisions, args.keep)))
        elif args._one == "variants":
            print(json.dumps(measure_variants(args.checkpoint, args.precisions)))
        else:
            print(json.dumps(measure(args.checkpoint, args._one, args.trace)))
        return 0
    results: dict[str, object] = {"checkpoint": str(args.checkpoint), "trace": args.trace,
                                  "largest_tensor_gb": round(
                                      largest_tensor_bytes(args.checkpoint) / 1e9, 3)}
    for mode in args.modes:
        keep = ["--keep", str(args.keep)] if args.keep else []
        out = subprocess.run([sys.executable, __file__, str(args.checkpoint), "--_one", mode,
                              "--trace", args.trace, "--precisions", *args.precisions, *keep],
                             capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    largest = float(results["largest_tensor_gb"])  # type: ignore[arg-type]
    results["stream_target_gb"] = round(1.3 * largest + 1.5, 2)
    print(json.dumps(results, indent=2))
    print("\n| mode | time (s) | peak RSS (GB) | ONNX size (GB) |\n|---|---|---|---|")
    for mode in args.modes:
        r = results[mode]
        size = r.get("onnx_gb", "-")  # type: ignore[union-attr]
        print(f"| {mode} | {r['seconds']} | {r['peak_rss_gb']} | {size} |")  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
