#!/usr/bin/env python3
"""Time and peak memory of the Qwen3-VL fp32 export (vision + decoder graphs), by path.

Each mode runs in its own subprocess so its peak RSS is its own:

    python scripts/bench.py vl-export-cost /tmp/vl-2b --build 2B     # write a random 2B shape first
    python scripts/bench.py vl-export-cost /tmp/vl-2b --modes stream eager

Modes:
    stream   meta trace, weights streamed from the shards (``export_onnx``, the default path)
    memory   the same trace, weights from the whole fp32 model loaded first (``weights="memory"``)
    eager    the path before streaming: the fp32 model loaded and traced with its weights
             (``export_module``, in-memory ONNX proto)

``stream`` also reports, in a second process, what an onnxruntime session on the fp32 vision
graph costs: the int8/int4 decoders are calibrated through it (``vl_calibration``).

Target from issue 17: streamed peak RSS <= 1.3 x the largest fp32 tensor + 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from pathlib import Path
from qwen3emb.convert import family_for, load_checkpoint
checkpoint, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
family = family_for(load_checkpoint(checkpoint))
specs = family.graph_specs(family.embedding_dim, 18)
if mode == "eager":
    from qwen3emb.export.onnx.eager import export_module
    backbone = family.load_backbone()
    for spec in specs:
        example, dynamic = family.trace_inputs(spec.name, spec)
        export_module(family.graph_module(backbone, spec.name, None), example, dynamic, spec,
                      out / f"{spec.name}.onnx")
else:
    from qwen3emb.export.onnx.trace import export_onnx
    for spec in specs:
        export_onnx(family, out / f"{spec.name}.onnx", spec, weights=mode)
"""

SESSION_CHILD = """
import sys
import onnxruntime as ort
from qwen3emb.progress import peak_rss_bytes
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(peak_rss_bytes())
"""


def largest_tensor_bytes(checkpoint: Path) -> int:
    from qwen3emb.convert import load_checkpoint
    from qwen3emb.convert.weights import ShardedWeights

    shards = ShardedWeights(load_checkpoint(checkpoint).weight_files)
    return max(shards.nbytes(k) for k in shards)


def measure(checkpoint: Path, mode: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), out, mode],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{mode} export failed:\n{proc.stderr[-2000:]}")
        # ru_maxrss of the children so far is a running maximum: one mode per process.
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        sizes = {p.name: round(p.stat().st_size / 1e9, 3) for p in Path(out).iterdir()}
        result: dict[str, object] = {"seconds": round(seconds, 1),
                                     "peak_rss_gb": round(peak_kb / 1e6, 2), "files_gb": sizes}
        if mode == "stream":
            session = subprocess.run([sys.executable, "-c", SESSION_CHILD,
                                      str(Path(out) / "vision.onnx")],
                                     capture_output=True, text=True, check=True)
            result["vision_session_peak_rss_gb"] = round(
                int(session.stdout.strip().splitlines()[-1]) / 1e9, 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--modes", nargs="+", default=["stream"],
                        choices=["stream", "memory", "eager"])
    parser.add_argument("--build", metavar="PRESET",
                        help="first write a random checkpoint of this VL_PRESETS shape")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(measure(args.checkpoint, args._one)))
        return 0
    if args.build:
        from qwen3emb.convert.random_vl_checkpoint import write_random_vl_shards

        start = time.perf_counter()
        write_random_vl_shards(args.checkpoint, preset=args.build)
        print(f"wrote {args.build} checkpoint in {time.perf_counter() - start:.1f} s")
    largest = largest_tensor_bytes(args.checkpoint) / 1e9
    results: dict[str, object] = {"checkpoint": str(args.checkpoint),
                                  "largest_tensor_gb": round(largest, 3),
                                  "stream_target_gb": round(1.3 * largest + 1.5, 2)}
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, str(args.checkpoint), "--_one", mode],
                             capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
