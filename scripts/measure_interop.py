"""Cost of the ``last_hidden_state`` output (docs/interop.md) to our runtime, at batch 8 x 128.

Exports a random-weight checkpoint of the Qwen3-Embedding-0.6B width (fewer layers, so the
four extra nodes weigh more than in the real model: a conservative figure), fp32 and int8,
then strips the extra output and its nodes from a copy of each graph ("before": today's
graph) and times ``TextEmbedder.run_ids`` on both, round-robin, so background load hits both
alike. Prints the median seconds per call and the change, as JSON.

    PYTHONPATH=. python scripts/measure_interop.py --work /tmp/interop-speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


def strip_hidden_state(source: Path, target: Path) -> Path:
    """Copy ``source`` without ``last_hidden_state`` and the nodes that only feed it."""
    import onnx

    from qwen3emb.constants import LAST_HIDDEN_STATE

    model = onnx.load(os.fspath(source))
    kept = [o for o in model.graph.output if o.name != LAST_HIDDEN_STATE]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    nodes = [n for n in model.graph.node if not n.name.startswith("/interop/")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save_model(model, os.fspath(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from qwen3emb.convert.random_checkpoint import build_random_checkpoint
    from qwen3emb.pipeline import export_bundle
    from qwen3emb.runtime import TextEmbedder
    from qwen3emb.runtime.session import open_session

    checkpoint, bundle = args.work / "checkpoint", args.work / "bundle"
    if not (checkpoint / "config.json").is_file():
        build_random_checkpoint(checkpoint, preset="0.6B", num_hidden_layers=args.layers)
    if not (bundle / "manifest.json").is_file():
        export_bundle(checkpoint, bundle, validate=False, force=True, precisions=["int8"])
    results = {}
    for precision, name in (("fp32", "model.onnx"), ("int8", "model_int8.onnx")):
        embedder = TextEmbedder(bundle, precision=precision, threads=args.threads)
        before = open_session(strip_hidden_state(bundle / "onnx" / name,
                                                 args.work / f"before-{name}"),
                              threads=args.threads)
        sessions = {"before": before, "after": embedder.session}
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 1000, size=(8, 128), dtype=np.int64)
        mask = np.ones_like(ids)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        outputs = {}
        for i in range(args.runs + 2):
            for label, session in sessions.items():
                embedder.session = session
                start = time.perf_counter()
                outputs[label] = embedder.run_ids(ids, mask)
                if i >= 2:  # two warm-up rounds
                    times[label].append(time.perf_counter() - start)
        np.testing.assert_array_equal(outputs["before"], outputs["after"])
        median = {k: statistics.median(v) for k, v in times.items()}
        results[precision] = {**{f"{k}_s": round(v, 5) for k, v in median.items()},
                              "change_pct": round(100 * (median["after"] / median["before"] - 1),
                                                  2)}
    print(json.dumps({"layers": args.layers, "batch": 8, "length": 128, "runs": args.runs,
                      "threads": args.threads, "load": os.getloadavg(), **results}, indent=1))


if __name__ == "__main__":
    main()
