"""Compare int4 recipes (4-bit block size, which MatMuls stay 8-bit and how) on a bundle.

Builds each recipe from the bundle's optimized fp32 ``model.onnx`` (after the same calibration
and smoothing as the exporter), then measures min cosine to HuggingFace torch fp32 at the
bench cells and the torch/ONNX time ratio at 8x128, interleaved in one process. The table
in ``qwen3emb.export.quantize.INT4_8BIT_MATMULS`` came from this script.

    python scripts/measure_int4.py --bundle /tmp/bench/bundle-0.6B \\
        --checkpoint /tmp/bench/checkpoint-0.6B --work /tmp/int4 --recipes b32-vd b128-vod
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# name: (4-bit block size, symmetric, 8-bit roles, 8-bit kind: "dynamic" or "nbits<block>")
RECIPES: dict[str, tuple[int, bool, tuple[str, ...], str]] = {
    "b32-vd-nbits32": (32, True, ("v_proj", "down_proj"), "nbits32"),
    "b32-vd-nbits128": (32, True, ("v_proj", "down_proj"), "nbits128"),
    "b32-vd": (32, True, ("v_proj", "down_proj"), "dynamic"),
    "b32asym-vd": (32, False, ("v_proj", "down_proj"), "dynamic"),
    "b64-vd": (64, True, ("v_proj", "down_proj"), "dynamic"),
    "b128-vd": (128, True, ("v_proj", "down_proj"), "dynamic"),
    "b32-vkd": (32, True, ("v_proj", "k_proj", "down_proj"), "dynamic"),
    "b32-vod": (32, True, ("v_proj", "o_proj", "down_proj"), "dynamic"),
    "b64-vod": (64, True, ("v_proj", "o_proj", "down_proj"), "dynamic"),
    "b128-vod": (128, True, ("v_proj", "o_proj", "down_proj"), "dynamic"),
}
CELLS = ((1, 16), (8, 128), (1, 512))


def nbits(model: Any, bits: int, block: int, symmetric: bool, exclude: list[str]) -> Any:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from qwen3emb.export.quantize import INT4_ACCURACY_LEVEL

    config = mnq.DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=symmetric, accuracy_level=INT4_ACCURACY_LEVEL,
        op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),), bits=bits)
    quantizer = mnq.MatMulNBitsQuantizer(
        model, bits=bits, block_size=block, is_symmetric=symmetric,
        accuracy_level=INT4_ACCURACY_LEVEL, nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",), algo_config=config)
    quantizer.process()
    return quantizer.model.model


def build(model: Any, ranges: dict[str, np.ndarray], recipe: str, out: Path) -> Path:
    import onnx

    from qwen3emb.export import quantize as q
    from qwen3emb.export.precisions import _copy

    block, symmetric, roles, kind = RECIPES[recipe]
    variant = _copy(model)
    q.smooth(variant, dict(ranges), q.SMOOTH_ALPHA)
    names = [n.name for n in variant.graph.node if n.op_type == "MatMul"]
    wide = [n for n in names if n.endswith(tuple(f"{r}/MatMul" for r in roles))]
    if kind.startswith("nbits"):
        variant = nbits(variant, 8, int(kind[5:]), True, [n for n in names if n not in wide])
        variant = nbits(variant, 4, block, symmetric, [])
    else:
        variant = nbits(variant, 4, block, symmetric, wide)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            variant = q.dynamic_int8(variant, per_channel=True, workdir=Path(tmp))
    q.quantize_embedding(variant)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    onnx.save_model(variant, os.fspath(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--runs", type=int, default=3, help="timed runs at 8x128 (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    from qwen3emb.export.precisions import calibration_feeds
    from qwen3emb.export.quantize import calibrate

    paths = {r: args.work / r / "model.onnx" for r in args.recipes}
    if not all(p.is_file() for p in paths.values()):
        model = onnx.load(os.fspath(args.bundle / "onnx" / "model.onnx"))
        ranges = calibrate(model, calibration_feeds(args.checkpoint / "tokenizer.json"),
                           workdir=args.work)
        for recipe, path in paths.items():
            if not path.is_file():
                logging.info("building %s", recipe)
                build(model, ranges, recipe, path.parent)
        del model
    torch.set_num_threads(args.threads)
    reference = AutoModel.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    sessions = {}
    for recipe, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        sessions[recipe] = ort.InferenceSession(os.fspath(path), options,
                                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)  # the same inputs as scripts/bench.py --quick
    for batch, length in CELLS:
        ids = rng.integers(0, 151643, (batch, length), dtype=np.int64)
        ids[:, -1] = 151643
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
