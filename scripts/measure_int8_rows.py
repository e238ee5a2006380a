#!/usr/bin/env python3
"""Per-tensor against per-row int8 activations on a whole graph: fidelity and speed.

Builds three int8 plans of a bundle's fp32 graph (every MatMul per-tensor ``int8``; every
MatMul ``int8-row``; ``int8-row`` only for ``o_proj`` / ``down_proj``), each with the default
recipe's smoothing and embedding table, scores each on the calibration texts as the search does,
then on random token ids against the fp32 graph, and times each with onnxruntime.

    python scripts/measure_int8_rows.py --bundle /tmp/bench/bundle-0.6B [--work DIR]
    python scripts/measure_int8_rows.py --matmul [--work DIR]

Prints one JSON line per plan. ``--matmul`` instead times one MatMul of the 0.6B widths
(1024 x 3072 and a ``down_proj``'s 3072 x 1024) written by the exporter's own rewrite, per-tensor
and per-row, on Student-t(4) rows of log-normal sizes (as token activations are): time, relative
output error, and how far the first three rows move when run without the others.

The bundle's ``onnx/model.onnx`` is copied into ``--work``
(onnxruntime refuses linked external data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def _time(session, feed: dict, runs: int) -> float:
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def one_matmul(work: Path, threads: int) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qwen3emb.export.onnx.lazy import LazyGraph
    from qwen3emb.export.quant.ops import rewrite_int8, weight_matmuls

    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    for k, n in ((1024, 3072), (3072, 1024)):
        w = rng.normal(0, 0.02, (k, n)).astype(np.float32)
        source = work / f"matmul-{k}x{n}.onnx"
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["X", "w"], ["Y"], name="matmul")], "one",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", n])],
            [numpy_helper.from_array(w, "w")])
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                        str(source))
        sessions = {}
        for per_row in (False, True):
            lazy = LazyGraph(source)
            rewrite_int8(lazy, weight_matmuls(lazy), per_row=per_row)
            [path, *_] = lazy.save(work / f"matmul-{k}x{n}-{'row' if per_row else 'tensor'}.onnx",
                                   external=False)
            sessions["per-row" if per_row else "per-tensor"] = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"])
        for rows in (1024, 16):
            x = (rng.standard_t(4, (rows, k)) * np.exp(rng.normal(0, 1, (rows, 1)))
                 ).astype(np.float32)
            exact = x @ w
            for name, session in sessions.items():
                y = session.run(None, {"X": x})[0]
                alone = session.run(None, {"X": x[:3]})[0]
                error = np.linalg.norm(y - exact) / np.linalg.norm(exact)
                moved = np.abs(alone - y[:3]).max() / np.abs(y[:3]).max()
                print(json.dumps({"matmul": f"{rows}x{k} @ {k}x{n}", "activations": name,
                                  "ms": round(_time(session, {"X": x}, 30) * 1e3, 2),
                                  "relative_error": float(f"{error:.3g}"),
                                  "moves_alone": float(f"{moved:.3g}")}), flush=True)


def main() -> None:
    import onnxruntime as ort

    from qwen3emb.export.onnx.lazy import LazyGraph
    from qwen3emb.export.quant import planned
    from qwen3emb.export.quant import quantize as q
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds
    from qwen3emb.export.quant.scoring import score, scoring_feeds
    from qwen3emb.export.quant.search import Measurements
    from qwen3emb.export.quant.sensitivity import ActivationSamples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--matmul", action="store_true", help="time one MatMul instead")
    parser.add_argument("--work", type=Path, default=Path("int8-rows-work"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.matmul:
        one_matmul(args.work, args.threads)
        return
    if args.bundle is None:
        parser.error("--bundle is required (or --matmul)")
    source = args.work / "model.onnx"
    for name in ("model.onnx", "model.onnx_data"):
        if (args.bundle / "onnx" / name).exists() and not (args.work / name).exists():
            shutil.copyfile(args.bundle / "onnx" / name, args.work / name)

    feeds = calibration_feeds(args.bundle / "tokenizer.json")
    samples = ActivationSamples()
    calibration = calibrate(source, feeds, observe=samples.observe)
    smoothing = q.plan_smoothing(LazyGraph(source), calibration.ranges, q.SMOOTH_ALPHA)
    measurements = Measurements(source, samples, calibration, smoothing)
    smoothed = q.apply_smoothing(LazyGraph(source), smoothing, dict(calibration.ranges))
    recipe = {name: ("int8" if tier == "int8-row" else tier) for name, tier in
              planned.initial_plan(LazyGraph(source), "int8", "smoothquant", smoothed).items()}
    for role in ("q_proj", "o_proj", "down_proj"):
        errors = np.array([[e["int8"], e["int8-row"]] for n, e in measurements.errors.items()
                           if role in n])
        print(json.dumps({"role": role, "median_output_error_int8": round(float(
            np.median(errors[:, 0])), 4), "int8-row": round(float(np.median(errors[:, 1])), 4)}))
    plans = {
        "per-tensor": recipe,
        "per-row": {n: ("int8-row" if t == "int8" else t) for n, t in recipe.items()},
        "per-row o/down": {n: ("int8-row" if t == "int8" and ("o_proj" in n or "down_proj" in n)
                               else t) for n, t in recipe.items()},
    }
    columns = measurements.embedding.outlier_columns if measurements.embedding else ()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 100000, (8, 128)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    short = {k: v[:1, :16] for k, v in feed.items()}
    reference = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    exact = reference.run(["sentence_embedding"], feed)[0]
    del reference
    for name, plan in plans.items():
        target = args.work / name.replace(" ", "-").replace("/", "") / "model_int8.onnx"
        target.parent.mkdir(exist_ok=True)
        planned.build_planned(source, target, plan, smoothing, calibration.ranges, columns, True)
        fidelity = score(target, scoring_feeds(feeds), calibration.outputs)
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        got = session.run(["sentence_embedding"], feed)[0]
        cosine = (got * exact).sum(1) / (np.linalg.norm(got, axis=1)
                                         * np.linalg.norm(exact, axis=1))
        print(json.dumps({"plan": name, "tiers": planned.plan_summary(plan),
                          "calibration_min_cosine": round(fidelity, 6),
                          "random_8x128_min_cosine": round(float(cosine.min()), 6),
                          "s_8x128": round(_time(session, feed, 4), 3),
                          "s_1x16": round(_time(session, short, 10), 4)}), flush=True)
        del session


if __name__ == "__main__":
    main()
