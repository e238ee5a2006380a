"""Benchmark Qwen3-VL image embedding: HF torch fp32 against each ONNX precision pairing.

Builds (and caches under --work) a random-weight checkpoint in a real Qwen3-VL-Embedding
shape, exports it with fp32 / int8 / int4 (each decoder paired with the vision graph of its
precision), then times one square image at a time (448x448 by default: 784 patches, 196
visual tokens), warm, for each engine in its own subprocess (one model in memory at a time):

- ``torch-fp32``: transformers' ``Qwen3VLModel`` forward in fp32 (inputs made beforehand by
  the validator's HF preprocessing; last token, L2);
- ``onnx-<p>``: ``VLEmbedder(precision=p)`` end to end, host preprocessing included.

Each engine's vision tower and decoder are also timed apart. Reports seconds per image,
x torch, min cosine to torch, and with ``--profile`` the vision graph's onnxruntime kernel
time by op type, as JSON and Markdown.

    python scripts/bench_vl.py --work /tmp/bench-vl                   # 2B shape
    python scripts/bench_vl.py --work /tmp/bench-vl-tiny --preset tiny  # smoke run
    python scripts/bench_vl.py --work /tmp/bench-vl --decoder-layers 4  # fits ~5 GB

``--decoder-layers N`` exports a decoder of N layers instead of the preset's (torch fp32 of the
full 2B needs ~9 GB); the decoder time of the full depth is then estimated as N-layer decoder
time x depth / N and reported as such, beside the measured figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "int8", "int4")


def prepare(work: Path, preset: str, layers: int | None) -> tuple[Path, Path]:
    """The random checkpoint and its bundle (cached under ``work``)."""
    from qwen3emb.convert.random_vl_checkpoint import (
        build_random_vl_checkpoint,
        write_random_vl_shards,
    )
    from qwen3emb.pipeline import export_bundle

    tag = preset + (f"-L{layers}" if layers else "")
    checkpoint, bundle = work / f"checkpoint-{tag}", work / f"bundle-{tag}"
    if not (checkpoint / "config.json").is_file():
        logging.info("writing the random %s checkpoint", tag)
        if preset == "tiny":
            build_random_vl_checkpoint(checkpoint, preset="tiny")
        else:
            write_random_vl_shards(checkpoint, preset=preset, num_hidden_layers=layers)
    if not (bundle / "manifest.json").is_file():
        logging.info("exporting fp32 / int8 / int4 (minutes for a real shape)")
        start = time.perf_counter()
        export_bundle(checkpoint, bundle, validate=False, force=True,
                      precisions=["int8", "int4"])
        logging.info("exported in %.0f s", time.perf_counter() - start)
    return checkpoint, bundle


def images(count: int, size: int) -> list[Any]:
    from qwen3emb.convert._corpus import synthetic_image

    return [synthetic_image(size, size, seed=100 + i) for i in range(count)]


def peak_rss_mb() -> float:
    from qwen3emb.progress import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def time_calls(fn: Any, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def child_torch(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import Qwen3VLModel

    from qwen3emb.validate.vl_reference import ReferenceVLEmbedder

    torch.set_num_threads(args.threads)
    model = Qwen3VLModel.from_pretrained(args.checkpoint, dtype=torch.float32,
                                         attn_implementation="sdpa").eval()
    ref = ReferenceVLEmbedder(Path(args.checkpoint), model=model)
    vectors, total, vision = [], [], []
    for image in images(args.images, args.size):
        inputs = ref.inputs({"image": image}, None)

        def whole(inputs: dict[str, Any] = inputs) -> np.ndarray:
            with torch.inference_mode():
                hidden = model(**inputs).last_hidden_state
            vec = hidden[0, -1].float()
            return (vec / vec.norm()).numpy()

        def tower(inputs: dict[str, Any] = inputs) -> None:
            with torch.inference_mode():
                model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])

        vectors.append(whole())  # warm-up
        tower()
        total += time_calls(whole, args.runs)
        vision += time_calls(tower, args.runs)
    return {"vectors": np.stack(vectors).tolist(), "total": total, "vision": vision,
            "size_mb": sum(p.stat().st_size for p in Path(args.checkpoint).glob("*.safetensors"))
            / 2**20}


def child_onnx(args: argparse.Namespace) -> dict[str, Any]:
    from qwen3emb.runtime import VLEmbedder
    from qwen3emb.runtime.vl import choose_graphs

    precision = args.child.removeprefix("onnx-")
    embedder = VLEmbedder(args.bundle, precision=precision, threads=args.threads)
    instruction = "Represent the user's input."
    vectors, total, vision, decoder = [], [], [], []
    for image in images(args.images, args.size):
        item = {"image": image}
        vectors.append(embedder.encode([item])[0])  # warm-up
        prepared = embedder.prepare(item, 0, instruction)
        features = embedder.encode_visuals([prepared])
        total += time_calls(lambda: embedder.encode([item]), args.runs)  # noqa: B023
        vision += time_calls(lambda: embedder.encode_visuals([prepared]), args.runs)  # noqa: B023
        decoder += time_calls(lambda: embedder.run_decoder([prepared], features),  # noqa: B023
                              args.runs)
    graphs = [e["path"] for e in choose_graphs(embedder.manifest, precision)]
    # Each graph file and its external data file (<graph>.onnx_data).
    size = sum(a["size"] for a in embedder.manifest.artifacts
               if any(a["path"].startswith(path) for path in graphs))
    out: dict[str, Any] = {"vectors": np.stack(vectors).tolist(), "total": total,
                           "vision": vision, "decoder": decoder, "size_mb": size / 2**20,
                           "vision_precision": embedder.vision_precision}
    if args.profile:
        out["vision_ops"] = profile_vision(embedder, images(1, args.size)[0], args.threads)
    return out


def profile_vision(embedder: Any, image: Any, threads: int) -> dict[str, float]:
    """Seconds per run of onnxruntime kernels in the vision graph, by op type (2 runs)."""
    import onnxruntime as ort

    from qwen3emb.runtime.vl import vision_feeds

    entry = next(a for a in embedder.manifest.artifacts if a.get("graph") == "vision"
                 and a["precision"] == embedder.vision_precision and a.get("kind") == "onnx"
                 and a.get("role") == "vision")
    visual = embedder.prepare({"image": image}, 0, "x").visuals[0]
    feeds = vision_feeds(visual, embedder.geometry)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.fspath(Path(tempfile.gettempdir()) / "qwen3emb-bench-vl")
    session = ort.InferenceSession(os.fspath(embedder.manifest.root / entry["path"]), options,
                                   providers=["CPUExecutionProvider"])
    runs = 2
    for _ in range(runs + 1):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    ops: dict[str, float] = {}
    for e in events:
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and e["ts"] >= starts[1]):
            op = e["args"].get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + e["dur"] / 1e6 / runs
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def run_child(engine: str, args: argparse.Namespace, checkpoint: Path, bundle: Path
              ) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    command = [sys.executable, __file__, "--child", engine, "--result", os.fspath(result_path),
               "--checkpoint", os.fspath(checkpoint), "--bundle", os.fspath(bundle),
               "--images", str(args.images), "--runs", str(args.runs),
               "--threads", str(args.threads), "--size", str(args.size)]
    if args.profile:
        command.append("--profile")
    logging.info("timing %s", engine)
    subprocess.run(command, check=True)
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-vl-work"))
    parser.add_argument("--out", type=Path, default=None, help="results dir (default: WORK)")
    parser.add_argument("--preset", default="2B", choices=("tiny", "2B", "8B"))
    parser.add_argument("--decoder-layers", type=int, default=None,
                        help="text decoder depth instead of the preset's (to fit memory)")
    parser.add_argument("--images", type=int, default=2, help="distinct images")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per image")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=448, help="image side in pixels")
    parser.add_argument("--engines", nargs="*", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="vision graph kernel time by op type (onnxruntime profiler)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.child == "prepare":
        prepare(args.work, args.preset, args.decoder_layers)
        return
    if args.child:
        load = os.getloadavg()[0]
        result = child_torch(args) if args.child == "torch-fp32" else child_onnx(args)
        result["peak_rss_mb"] = round(peak_rss_mb())
        # Engines run one after another: a load change between them skews the ratios.
        result["load"] = [round(load, 1), round(os.getloadavg()[0], 1)]
        args.result.write_text(json.dumps(result))
        return
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    # The export runs in a process of its own, so its memory is gone before the timing.
    command = [sys.executable, __file__, "--child", "prepare", "--work", os.fspath(args.work),
               "--preset", args.preset]
    if args.decoder_layers:
        command += ["--decoder-layers", str(args.decoder_layers)]
    subprocess.run(command, check=True)
    checkpoint, bundle = prepare(args.work, args.preset, args.decoder_layers)  # cached now
    engines = args.engines or ["torch-fp32", *(f"onnx-{p}" for p in PRECISIONS)]
    load_start = os.getloadavg()[0]
    raw = {engine: run_child(engine, args, checkpoint, bundle) for engine in engines}
    config = json.loads((checkpoint / "config.json").read_text())
    depth = int(config["text_config"]["num_hidden_layers"])
    from qwen3emb.convert.random_vl_checkpoint import VL_PRESETS

    full_depth = int(VL_PRESETS[args.preset]["text"]["num_hidden_layers"])
    results = summarize(raw, depth, full_depth)
    import onnxruntime as ort
    import torch

    meta = {"preset": args.preset, "decoder_layers": depth, "preset_decoder_layers": full_depth,
            "image": f"{args.size}x{args.size}", "images": args.images, "runs": args.runs,
            "threads": args.threads, "cpu_count": os.cpu_count(),
            "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()[0],
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "note": "one image per call, warm (1 warm-up per image); p50 over images x runs; "
                    "each engine in its own process, one after another"}
    ops = {e: raw[e]["vision_ops"] for e in raw if "vision_ops" in raw[e]}
    (out / "bench_vl.json").write_text(json.dumps(
        {"meta": meta, "results": results, "vision_ops_s": ops}, indent=2))
    text = markdown(results, meta, ops)
    (out / "bench_vl.md").write_text(text)
    print(text)


def summarize(raw: dict[str, dict[str, Any]], depth: int, full_depth: int
              ) -> list[dict[str, Any]]:
    """Per engine: p50 seconds per image (whole, vision, decoder), x torch, min cosine."""
    reference = np.asarray(raw["torch-fp32"]["vectors"]) if "torch-fp32" in raw else None
    rows = []
    for engine, r in raw.items():
        total, vision = float(np.median(r["total"])), float(np.median(r["vision"]))
        decoder = float(np.median(r["decoder"])) if "decoder" in r else total - vision
        row = {"engine": engine, "vision_precision": r.get("vision_precision", "fp32"),
               "s_per_image": round(total, 4), "vision_s": round(vision, 4),
               "decoder_s": round(decoder, 4), "size_mb": round(r["size_mb"], 1),
               "peak_rss_mb": r["peak_rss_mb"], "load_1min": r.get("load")}
        if depth != full_depth:
            # Decoder time grows with depth; vision and host work do not.
            row["s_per_image_full_depth_est"] = round(total + decoder * (full_depth / depth - 1),
                                                      4)
        if reference is not None:
            vectors = np.asarray(r["vectors"])
            row["min_cosine_to_torch"] = round(float(np.min((vectors * reference).sum(1))), 6)
        rows.append(row)
    torch_row = next((r for r in rows if r["engine"] == "torch-fp32"), None)
    for row in rows:
        if torch_row is not None:
            for key in ("s_per_image", "vision_s", "s_per_image_full_depth_est"):
                if key in row:
                    row[f"x_torch_{key}"] = round(torch_row[key] / row[key], 2)
    return rows


def markdown(results: list[dict[str, Any]], meta: dict[str, Any],
             ops: dict[str, dict[str, float]]) -> str:
    est = "s_per_image_full_depth_est" in results[0]
    head = ("| engine | vision graph | s / image | × torch | vision s | × torch (vision) | "
            "decoder s |" + (f" est. s / image at {meta['preset_decoder_layers']} layers | "
                             "× torch (est.) |" if est else "")
            + " min cos to torch | size MB | peak RSS MB | 1-min load |\n")
    head += "|" + "---|" * (head.count("|") - 1) + "\n"
    rows = ""
    for r in results:
        rows += (f"| {r['engine']} | {r['vision_precision']} | {r['s_per_image']:.3f} | "
                 f"{r.get('x_torch_s_per_image', float('nan')):.2f} | {r['vision_s']:.3f} | "
                 f"{r.get('x_torch_vision_s', float('nan')):.2f} | {r['decoder_s']:.3f} |")
        if est:
            rows += (f" {r['s_per_image_full_depth_est']:.3f} | "
                     f"{r.get('x_torch_s_per_image_full_depth_est', float('nan')):.2f} |")
        load = r.get("load_1min") or ["?", "?"]
        rows += (f" {r.get('min_cosine_to_torch', float('nan')):.6f} | {r['size_mb']:.0f} | "
                 f"{r['peak_rss_mb']} | {load[0]} → {load[1]} |\n")
    text = (f"Qwen3-VL {meta['preset']} shape (random weights, decoder {meta['decoder_layers']} "
            f"of {meta['preset_decoder_layers']} layers), {meta['image']} images, one per call, "
            f"{meta['threads']} threads, {meta['images']} images x {meta['runs']} runs, "
            f"onnxruntime {meta['onnxruntime']}, torch {meta['torch']}, 1-min load "
            f"{meta['load_average_at_start']:.1f} → {meta['load_average_at_end']:.1f} on "
            f"{meta['cpu_count']} cores\n\n" + head + rows)
    for engine, table in ops.items():
        total = sum(table.values())
        top = ", ".join(f"{op} {s:.3f} s ({s / total:.0%})" for op, s in list(table.items())[:8])
        text += f"\n{engine} vision graph kernels, {total:.3f} s per run: {top}\n"
    return text


if __name__ == "__main__":
    main()
