#!/usr/bin/env python3
"""Per-tensor against per-row int8 activations on a whole graph: fidelity and speed.

Builds three int8 plans of a bundle's fp32 graph (every MatMul per-tensor ``int8``; every
MatMul ``int8-row``; ``int8-row`` only for ``o_proj`` / ``down_proj``), each with the default
recipe's smoothing and embedding table, scores each on the calibration texts as the search does,
then on random token ids against the fp32 graph, and times each with onnxruntime.

    python scripts/measure_int8_rows.py --bundle /tmp/bench/bundle-0.6B [--work DIR]

Prints one JSON line per plan. The bundle's ``onnx/model.onnx`` is copied into ``--work``
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


def main() -> None:
    import onnxruntime as ort

    from qwen3emb.export.onnx.lazy import LazyGraph
    from qwen3emb.export.quant import planned
    from qwen3emb.export.quant import quantize as q
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds
    from qwen3emb.export.quant.search import Measurements, score, scoring_feeds
    from qwen3emb.export.quant.sensitivity import ActivationSamples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("int8-rows-work"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
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
