"""Fidelity of every int8 scheme (and int4) for the Qwen3-VL decoder, alone and batched.

Builds the VL outlier fixture (tests/test_vl_precision.py), exports its fp32 graphs, calibrates
the decoder as the exporter does, builds each candidate with the streamed variant builders, and
runs every probe of the validator through the whole pipeline (host preprocessing, fp32 vision
graph, candidate decoder) one at a time and all in one batch. Prints the minimum cosine to the
HF fp32 reference of each; ``int8-row`` is where the fidelity search would start (smoothquant's
smoothing, every MatMul int8 with per-row activations).

    python scripts/measure_vl_int8.py --work /tmp/vl-int8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("vl-int8-work"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort
    from test_vl_precision import plant_vl_outliers

    from qwen3emb.convert.random_vl_checkpoint import build_random_vl_checkpoint
    from qwen3emb.export.quant import quantize as q
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.variants import build_variant
    from qwen3emb.export.quant.vl_calibration import vl_calibration_feeds
    from qwen3emb.pipeline import export_bundle
    from qwen3emb.runtime.vl import VLEmbedder, choose_graphs
    from qwen3emb.validate.vl_probes import build_vl_probes
    from qwen3emb.validate.vl_reference import ReferenceVLEmbedder

    checkpoint = build_random_vl_checkpoint(args.work / "ckpt", modify=plant_vl_outliers)
    bundle = export_bundle(checkpoint, args.work / "bundle", validate=False, force=True).bundle
    embedder = VLEmbedder(bundle, verify=False)
    probes = build_vl_probes(Path(tempfile.mkdtemp(dir=args.work)))
    reference = ReferenceVLEmbedder(checkpoint)
    expected = np.stack([reference.embed(p.item, p.instruction) for p in probes])
    plain = [i for i, p in enumerate(probes) if p.instruction is None]
    fp32 = bundle / "onnx" / "decoder.onnx"
    feeds = vl_calibration_feeds(embedder.manifest, choose_graphs(embedder.manifest, "fp32")[1])
    calibration = calibrate(fp32, feeds)
    rows = []
    for candidate in (q.NAIVE_INT8_SCHEME, *q.INT8_SCHEMES, "int4", "int8-row"):
        target = args.work / f"decoder-{candidate}.onnx"
        if candidate == "int8-row":  # the search's start: smoothquant with per-row activations
            from qwen3emb.export.onnx.lazy import LazyGraph
            from qwen3emb.export.quant import planned

            smoothing = q.plan_smoothing(LazyGraph(fp32), calibration.ranges, q.SMOOTH_ALPHA)
            smoothed = q.apply_smoothing(LazyGraph(fp32), smoothing, dict(calibration.ranges))
            plan = planned.initial_plan(LazyGraph(fp32), "int8", "smoothquant", smoothed)
            planned.build_planned(fp32, target, plan, smoothing, calibration.ranges, (), False)
            model = type("Built", (), {"path": target})
        elif candidate == "int4":
            model = build_variant(fp32, "int4", calibration=calibration, target=target)
        else:
            model = build_variant(fp32, "int8", calibration=calibration, int8_scheme=candidate,
                                  target=target)
        embedder.decoder = ort.InferenceSession(str(model.path),
                                                providers=["CPUExecutionProvider"])
        alone = np.concatenate([embedder.encode([p.item], instruction=p.instruction)
                                for p in probes])
        batch = embedder.encode([probes[i].item for i in plain], batch_size=len(plain))
        rows.append({"candidate": candidate,
                     "alone": round(float((alone * expected).sum(1).min()), 6),
                     "batched": round(float((batch * expected[plain]).sum(1).min()), 6)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
