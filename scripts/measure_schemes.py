"""Fidelity of every int8 scheme and int4 setting on the outlier fixture (tests/test_precision.py).

Builds the fixture checkpoint, exports its fp32 graph, then builds each candidate from it and
reports the minimum cosine to the HuggingFace fp32 reference over the built-in probe set, and
how many MatMuls each scheme had to keep in fp32. Speed is measured by scripts/bench.py on
the 0.6B shape (the fixture is too small to time).

    python scripts/measure_schemes.py --work /tmp/schemes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("schemes-work"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from test_precision import _int8, _min_cosine, _run_model, plant_outliers

    from qwen3emb.convert.random_checkpoint import build_random_checkpoint
    from qwen3emb.export.onnx.lazy import LazyGraph
    from qwen3emb.export.quant import quantize as q
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.ops import rewrite_embedding, rewrite_nbits, weight_matmuls
    from qwen3emb.export.quant.precisions import calibration_feeds
    from qwen3emb.pipeline import export_bundle
    from qwen3emb.validate.probes import build_probes
    from qwen3emb.validate.reference import ReferenceEmbedder

    rows = []
    for label, modify, layers in (("outlier", plant_outliers, 3), ("normal", None, 2)):
        checkpoint = build_random_checkpoint(args.work / f"{label}-ckpt", preset="tiny",
                                             modify=modify, num_hidden_layers=layers)
        bundle = export_bundle(checkpoint, args.work / f"{label}-bundle", validate=False,
                               force=True).bundle
        texts = [t for _, t in build_probes(256).texts]
        reference = ReferenceEmbedder(checkpoint).embed(texts, 256)
        for scheme in ("naive", *q.INT8_SCHEMES):
            model, settings = _int8(bundle, scheme, args.work)
            cosine = _min_cosine(_run_model(model, bundle, texts), reference)
            rows.append({"fixture": label, "candidate": f"int8 {scheme}",
                         "min_cosine": round(cosine, 6),
                         "fp32_matmuls": len(settings.get("fp32_matmuls", []))})
        source = bundle / "onnx" / "model.onnx"
        ranges = calibrate(source, calibration_feeds(bundle / "tokenizer.json")).ranges
        # All-4-bit MatMuls with an 8-bit embedding; the 4-bit embedding table was measured
        # and dropped earlier (it loses every ordinary channel of a block with an outlier).
        for smooth in (False, True):
            for block in (32, 64, 128):
                for level in (0, 4):
                    graph = LazyGraph(source)
                    if smooth:
                        q.apply_smoothing(graph, q.plan_smoothing(graph, ranges), ranges)
                    rewrite_nbits(graph, weight_matmuls(graph), bits=4, block_size=block,
                                  accuracy_level=level)
                    rewrite_embedding(graph, block_size=q.EMBEDDING_BLOCK_SIZE)
                    path = args.work / f"{label}-int4.onnx"
                    graph.save(path, external=False)
                    cosine = _min_cosine(_run_model(path, bundle, texts), reference)
                    rows.append({"fixture": label,
                                 "candidate": f"int4 block {block} acc {level} "
                                              f"smooth {smooth} embedding int8",
                                 "min_cosine": round(cosine, 6)})
        for row in rows:
            if row["fixture"] == label:
                print(f"{label:8s} {row['candidate']:55s} {row['min_cosine']:.6f} "
                      f"{row.get('fp32_matmuls', '')}", flush=True)
    (args.work / "schemes.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
