"""Compare int4 recipes (4-bit block size, which MatMuls stay 8-bit and how) on a bundle.

Builds each recipe from the bundle's optimized fp32 ``model.onnx`` with the streamed variant
builders (after the same calibration and smoothing as the exporter), then measures min cosine
to HuggingFace torch fp32 at the bench cells and the torch/ONNX time ratio at 8x128,
interleaved in one process. The table in ``qwen3emb.export.quant.quantize.INT4_8BIT_MATMULS`` came
from this script (its ``b32asym-vd`` row, 4-bit with zero points, was measured with
onnxruntime's ``MatMulNBitsQuantizer`` before the builders were streamed; they write
symmetric blocks only). ``exporter`` is what ``build_variant`` writes, outlier fallback
included.

    python scripts/measure_int4.py --bundle /tmp/bench/bundle-0.6B \\
        --checkpoint /tmp/bench/checkpoint-0.6B --work /tmp/int4 --recipes b32-vd exporter
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

# name: (4-bit block size, 8-bit roles, 8-bit kind: "dynamic" or "nbits<block>")
RECIPES: dict[str, tuple[int, tuple[str, ...], str]] = {
    "b32-vd-nbits32": (32, ("v_proj", "down_proj"), "nbits32"),
    "b32-vd-nbits128": (32, ("v_proj", "down_proj"), "nbits128"),
    "b32-vd": (32, ("v_proj", "down_proj"), "dynamic"),
    "b64-vd": (64, ("v_proj", "down_proj"), "dynamic"),
    "b128-vd": (128, ("v_proj", "down_proj"), "dynamic"),
    "b32-vkd": (32, ("v_proj", "k_proj", "down_proj"), "dynamic"),
    "b32-vod": (32, ("v_proj", "o_proj", "down_proj"), "dynamic"),
    "b64-vod": (64, ("v_proj", "o_proj", "down_proj"), "dynamic"),
    "b128-vod": (128, ("v_proj", "o_proj", "down_proj"), "dynamic"),
}
EXPORTER = "exporter"
CELLS = ((1, 16), (8, 128), (1, 512))


def build(source: Path, calibration: Any, plan: list[Any], recipe: str, out: Path) -> Path:
    """Write ``recipe`` of the fp32 graph ``source`` to ``out/model.onnx``."""
    from qwen3emb.export.onnx.lazy import LazyGraph
    from qwen3emb.export.quant import quantize as q
    from qwen3emb.export.quant.ops import (
        rewrite_embedding,
        rewrite_int8,
        rewrite_nbits,
        weight_matmuls,
    )
    from qwen3emb.export.quant.variants import build_variant

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    if recipe == EXPORTER:
        build_variant(source, "int4", calibration=calibration, target=path, external=True,
                      smoothing=plan)
        return path
    block, roles, kind = RECIPES[recipe]
    graph = LazyGraph(source)
    q.apply_smoothing(graph, plan, calibration.ranges)
    wide = [m for m in weight_matmuls(graph)
            if m.name.endswith(tuple(f"{r}/MatMul" for r in roles))]
    if kind.startswith("nbits"):
        rewrite_nbits(graph, wide, bits=8, block_size=int(kind[len("nbits"):]),
                      accuracy_level=q.INT4_ACCURACY_LEVEL)
    else:
        rewrite_int8(graph, wide, per_channel=True)
    rewrite_nbits(graph, weight_matmuls(graph), bits=4, block_size=block,
                  accuracy_level=q.INT4_ACCURACY_LEVEL)
    rewrite_embedding(graph, block_size=q.EMBEDDING_BLOCK_SIZE)
    graph.save(path, external=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--recipes", nargs="*", default=[*RECIPES, EXPORTER],
                        choices=[*RECIPES, EXPORTER])
    parser.add_argument("--runs", type=int, default=3, help="timed runs at 8x128 (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    from qwen3emb.export.onnx.lazy import LazyGraph
    from qwen3emb.export.quant import quantize as q
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds

    source = args.bundle / "onnx" / "model.onnx"
    paths = {r: args.work / r / "model.onnx" for r in args.recipes}
    if not all(p.is_file() for p in paths.values()):
        calibration = calibrate(source, calibration_feeds(args.checkpoint / "tokenizer.json"))
        plan = q.plan_smoothing(LazyGraph(source), calibration.ranges, q.SMOOTH_ALPHA)
        for recipe, path in paths.items():
            if not path.is_file():
                logging.info("building %s", recipe)
                build(source, calibration, plan, recipe, path.parent)
    torch.set_num_threads(args.threads)
    reference = AutoModel.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    sessions = {}
    for recipe, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        sessions[recipe] = ort.InferenceSession(os.fspath(path), options,
                                                providers=["CPUExecutionProvider"])
    # The same inputs as scripts/bench.py --quick on the 0.6B shape; a smaller vocabulary
    # (a tiny random checkpoint) draws from its own ids and ends on its own end token.
    high = min(151643, reference.config.vocab_size)
    end = reference.config.eos_token_id
    end = 151643 if end is None else end[0] if isinstance(end, list) else end
    rng = np.random.default_rng(0)
    for batch, length in CELLS:
        ids = rng.integers(0, high, (batch, length), dtype=np.int64)
        ids[:, -1] = end
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

        def run_torch(feed: dict[str, np.ndarray] = feed) -> np.ndarray:
            with torch.inference_mode():
                hidden = reference(**{k: torch.from_numpy(v) for k, v in feed.items()})
            return torch.nn.functional.normalize(hidden.last_hidden_state[:, -1], dim=-1).numpy()

        want = run_torch()
        times: dict[str, list[float]] = {name: [] for name in ["torch", *sessions]}
        timed = args.runs if (batch, length) == (8, 128) else 0
        for _ in range(timed):
            start = time.perf_counter()
            run_torch()
            times["torch"].append(time.perf_counter() - start)
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append(time.perf_counter() - start)
        for name, session in sessions.items():
            got = session.run(None, feed)[0]
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            speed = (f"  x{np.median(times['torch']) / np.median(times[name]):.2f}"
                     if timed else "")
            print(f"{batch}x{length} {name:18s} min cos {cos.min():.6f}{speed}"
                  f"  load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
