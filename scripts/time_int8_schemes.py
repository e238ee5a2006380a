"""Time the int8 schemes against fp32 on a 0.6B-width text model with a few layers.

Builds a random checkpoint of the Qwen3-Embedding-0.6B shape cut to --layers layers, exports
fp32, builds each int8 scheme with the streamed variant builders and times one batch
(--batch x --length tokens) round-robin, so background load hits every engine alike. Prints
median and best seconds. A lighter companion of scripts/bench.py, which times the full 0.6B model.

    python scripts/time_int8_schemes.py --work /tmp/int8-speed
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("int8-speed-work"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort

    from qwen3emb.convert.random_checkpoint import build_random_checkpoint
    from qwen3emb.export.quant import quantize as q
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds
    from qwen3emb.export.quant.variants import build_variant
    from qwen3emb.pipeline import export_bundle

    checkpoint = build_random_checkpoint(args.work / "ckpt", preset="0.6B",
                                         num_hidden_layers=args.layers)
    bundle = export_bundle(checkpoint, args.work / "bundle", validate=False, force=True).bundle
    fp32 = bundle / "onnx" / "model.onnx"
    calibration = calibrate(fp32, calibration_feeds(bundle / "tokenizer.json"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    models = {"fp32": fp32}
    for scheme in q.INT8_SCHEMES:
        models[scheme] = build_variant(fp32, "int8", calibration=calibration, int8_scheme=scheme,
                                       target=args.work / f"int8-{scheme}.onnx").path
    sessions = {name: ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
                for name, path in models.items()}
    ids = np.random.default_rng(0).integers(0, 1000, (args.batch, args.length)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feeds)
    for _ in range(args.repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:12s} median {np.median(values):.3f} s  best {min(values):.3f} s")


if __name__ == "__main__":
    main()
