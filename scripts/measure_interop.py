"""Cost of the ``last_hidden_state`` output (docs/interop.md) to our runtime, at batch 8 x 128.

Exports a random-weight checkpoint of the Qwen3-Embedding-0.6B width (fewer layers, so the
four extra nodes weigh more than in the real model: a conservative figure), fp32 and int8,
then strips the extra output and its nodes from a copy of each graph ("before": today's
graph) and times ``TextEmbedder.run_ids`` on both, round-robin, so background load hits both
alike. Prints the median and minimum wall and CPU seconds per call (one onnxruntime thread
by default, so CPU time is the work done and moves less with other processes' load) and the
change,
plus the share of the graph's kernel time that the four added nodes take (onnxruntime's
profiler), as JSON. A third session of the unchanged graph ("control") shows the noise.

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


def added_node_share(model: Path, feeds: dict[str, np.ndarray], threads: int) -> float:
    """Percent of the graph's kernel time spent in the ``/interop/`` nodes, over 3 runs."""
    import json as _json
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = os.fspath(Path(tempfile.gettempdir()) / "qwen3emb-interop")
    session = ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
    for _ in range(4):
        session.run(None, feeds)  # every output, as other loaders run it
    trace = Path(session.end_profiling())
    events = _json.loads(trace.read_text())
    trace.unlink()
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and e["ts"] >= starts[1]]
    added = sum(e["dur"] for e in kernels if e["name"].startswith("/interop/"))
    return round(100 * added / sum(e["dur"] for e in kernels), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
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
        # "control" is the before graph in a second session: its change against "before" is
        # the noise floor of the measurement on this machine at this load.
        control = open_session(args.work / f"before-{name}", threads=args.threads)
        sessions = {"before": before, "control": control, "after": embedder.session}
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 1000, size=(8, 128), dtype=np.int64)
        mask = np.ones_like(ids)
        wall: dict[str, list[float]] = {k: [] for k in sessions}
        cpu: dict[str, list[float]] = {k: [] for k in sessions}
        outputs = {}
        for i in range(args.runs + 2):
            for label, session in sessions.items():
                embedder.session = session
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[label] = embedder.run_ids(ids, mask)
                if i >= 2:  # two warm-up rounds
                    wall[label].append(time.perf_counter() - start)
                    cpu[label].append(time.process_time() - start_cpu)
        np.testing.assert_array_equal(outputs["before"], outputs["after"])
        np.testing.assert_array_equal(outputs["before"], outputs["control"])
        row: dict[str, float] = {}
        for kind, series in (("wall", wall), ("cpu", cpu)):
            for stat, reduce in (("median", statistics.median), ("min", min)):
                value = {k: reduce(v) for k, v in series.items()}
                row.update({f"{kind}_{stat}_{k}_s": round(v, 5) for k, v in value.items()})
                for k in ("control", "after"):
                    row[f"{kind}_{stat}_{k}_change_pct"] = round(
                        100 * (value[k] / value["before"] - 1), 2)
        row["added_nodes_kernel_share_pct"] = added_node_share(
            bundle / "onnx" / name, {"input_ids": ids, "attention_mask": mask}, args.threads)
        results[precision] = row
    print(json.dumps({"layers": args.layers, "batch": 8, "length": 128, "runs": args.runs,
                      "threads": args.threads, "load": os.getloadavg(), **results}, indent=1))


if __name__ == "__main__":
    main()
