"""Benchmark HuggingFace torch fp32 against every ONNX precision, in one process.

Builds (and caches under --work) a random-weight checkpoint in the real Qwen3-Embedding-0.6B
shape, exports it with all precisions, builds the other int8 schemes beside the bundle, then
measures each cell of the grid for every engine, round-robin (one run of each engine in turn),
so background load hits all engines alike. Reports tokens/s, p50 latency, RSS growth,
artifact size and cosine to torch fp32, as JSON, a Markdown table and a PNG chart, plus the
fp32 and int8 ceilings: onnxruntime's own GEMM kernel time in the fp32 graph and in the searched
int8 graph against torch's p50 (how fast each graph could be if every other node were free).

``--peers`` adds other runtimes on the same checkpoint, timed in the same rounds with the same
threads (see scripts/bench_peers.py): llama.cpp on our GGUF at q8_0 and q4_k_m,
onnxruntime-genai's model-builder graph run with plain onnxruntime, and OpenVINO compiling our
fp32 graph. A peer whose package is missing is reported as skipped.

    python scripts/bench.py --work /tmp/bench --quick
    python scripts/bench.py --work /tmp/bench --quick --peers
    python scripts/bench.py --work /tmp/bench-tiny --quick --peers --preset tiny   # smoke test
    python scripts/bench.py --work /tmp/bench --cells 8x128 --onnx aimed=OUT/onnx/model_int8.onnx
    python scripts/bench.py --work /tmp/frontier --frontier      # scripts/bench_frontier.py
    python scripts/bench.py --work /tmp/bench --sweep            # scripts/bench_lengths.py

Tools that take their own arguments run as ``bench.py TOOL ARGS...`` (see :data:`TOOLS`):

    python scripts/bench.py export-cost CHECKPOINT --modes bundle   # the default export's cost
    python scripts/bench.py vl-export-cost CHECKPOINT --modes stream eager
    python scripts/bench.py batch-independence BUNDLE
    python scripts/bench.py kernels 128 1024 3072                   # one MatMul, every kernel
    python scripts/bench.py attention 2048 8192 32768               # one attention layer
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = {"export-cost": "bench_export", "vl-export-cost": "bench_vl_export",
         "batch-independence": "bench_batch", "kernels": "bench_kernels",
         "attention": "bench_attention"}
"""``bench.py TOOL ARGS...``: the script module that runs it, with ``ARGS`` as its argv."""
GRID_BATCH = (1, 8, 32)
GRID_LENGTH = (16, 128, 512)
QUICK_CELLS = ((1, 16), (8, 128), (1, 512))


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakRss:
    """Sample the process RSS every 20 ms while a block runs."""

    def __enter__(self) -> PeakRss:
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def prepare(work: Path, preset: str = "0.6B", *, fixed_recipes: bool = True
            ) -> tuple[Path, Path, dict[str, Path]]:
    """Checkpoint, bundle and the ONNX file of each engine (cached under ``work``); without
    ``fixed_recipes``, only the bundle's own graphs."""
    from qwen3emb.convert.random_checkpoint import REAL_VOCAB_SIZE, build_random_checkpoint
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds
    from qwen3emb.export.quant.quantize import (
        DEFAULT_INT8_SCHEME,
        INT4_ACCURACY_LEVEL,
        INT8_SCHEMES,
    )
    from qwen3emb.export.quant.variants import build_variant
    from qwen3emb.pipeline import export_bundle

    checkpoint, bundle = work / f"checkpoint-{preset}", work / f"bundle-{preset}"
    # Variant directories of other presets get a suffix (0.6B keeps the names of older caches).
    tag = "" if preset == "0.6B" else f"-{preset}"
    if not (checkpoint / "config.json").is_file():
        logging.info("building the random %s checkpoint (a minute for 0.6B)", preset)
        # The real vocabulary whatever the preset: the grid's ids are drawn from it.
        build_random_checkpoint(checkpoint, preset=preset, vocab_size=REAL_VOCAB_SIZE)
    if not (bundle / "manifest.json").is_file():
        logging.info("exporting fp32/fp16/int8/int4 (several minutes)")
        export_bundle(checkpoint, bundle, validate=False, force=True,
                      precisions=["fp16", "int8", "int4"])
    onnx_dir = bundle / "onnx"
    # The bundle's int8/int4 come from the accuracy-driven search (the export's default); the
    # fixed recipes (what --int8-scheme forces) are built beside it for comparison.
    files = {"onnx-fp32": onnx_dir / "model.onnx", "onnx-fp16": onnx_dir / "model_fp16.onnx",
             "onnx-int8-searched": onnx_dir / "model_int8.onnx",
             "onnx-int4-searched": onnx_dir / "model_int4.onnx"}
    fixed = {f"onnx-int8-{s}": ("int8", s, INT4_ACCURACY_LEVEL) for s in INT8_SCHEMES}
    fixed |= {f"onnx-int4-acc{level}": ("int4", DEFAULT_INT8_SCHEME, level) for level in (0, 4)}
    paths = {name: work / f"{name.removeprefix('onnx-')}{tag}" / "model.onnx" for name in fixed}
    missing = [name for name in fixed if not paths[name].is_file()] if fixed_recipes else []
    if missing:
        feeds = calibration_feeds(checkpoint / "tokenizer.json")
        calibration = calibrate(files["onnx-fp32"], feeds)
        for name in missing:
            precision, scheme, level = fixed[name]
            logging.info("building the fixed recipe %s", name)
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            build_variant(files["onnx-fp32"], precision, calibration=calibration,
                          int8_scheme=scheme, target=paths[name], external=True,
                          int4_accuracy_level=level)
    files |= {name: path for name, path in paths.items() if path.is_file()}
    return checkpoint, bundle, files


GEMM_OPS = ("MatMul", "FusedMatMul", "Gemm")
INT8_GEMM_OPS = GEMM_OPS + ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger",
                            "MatMulNBits")
"""The int8 graph's products: its quantized projections and its fp32 attention products."""


def gemm_time(model: Path, feeds: dict[str, np.ndarray], threads: int, runs: int = 2,
              ops: tuple[str, ...] = GEMM_OPS) -> float:
    """Seconds per run that onnxruntime's GEMM kernels (``ops``) take inside ``model``.

    Profiles ``runs`` runs after a warm-up and sums the kernel time of every MatMul-type node
    (projections and attention products). Even if every other node took no time, the graph
    could not run faster than this, so ``torch p50 / gemm_time`` bounds what fp32 ONNX can
    reach against torch on this machine.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.fspath(Path(tempfile.gettempdir()) / "qwen3emb-bench")
    session = ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    # Kernel events of the timed runs (the first run in a profiled session is a warm-up).
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    kernel_us = sum(e["dur"] for e in events
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                    and e["args"].get("op_name") in ops and e["ts"] >= starts[1])
    return kernel_us / 1e6 / runs


def embed_with(engine: Any, name: str, ids: np.ndarray, mask: np.ndarray, *, peer: bool
               ) -> np.ndarray:
    """Unit embeddings of right-padded ``ids`` from one engine: HF torch (``torch-fp32``: the
    last position, as the grid's rows are unpadded), a peer's embed function, or an
    onnxruntime session of our graph."""
    if name == "torch-fp32":
        import torch

        with torch.inference_mode():
            hidden = engine(input_ids=torch.from_numpy(ids),
                            attention_mask=torch.from_numpy(mask)).last_hidden_state
        vec = hidden[:, -1].float()
        return (vec / vec.norm(dim=-1, keepdim=True)).numpy()
    if peer:
        return engine(ids, mask)
    return engine.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def size_of(path: Path) -> int:
    """A model file with its external data (``<name>_data``, or ``<name>.data`` before)."""
    data = [path.with_name(path.name + suffix) for suffix in ("_data", ".data")]
    return path.stat().st_size + sum(d.stat().st_size for d in data if d.exists())


def run_tool(argv: list[str]) -> int:
    """``bench.py TOOL ARGS...``: the tool's own ``main`` with ``ARGS`` as its arguments."""
    import importlib

    module = importlib.import_module(TOOLS[argv[0]])
    sys.argv = [module.__file__, *argv[1:]]
    return module.main() or 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        sys.exit(run_tool(sys.argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=f"tools: {', '.join(TOOLS)} (bench.py TOOL --help)")
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--out", type=Path, default=None, help="results dir (default: WORK)")
    parser.add_argument("--quick", action="store_true", help=f"only cells {QUICK_CELLS}")
    parser.add_argument("--cells", nargs="*", default=None, metavar="BxS",
                        help="only these cells, e.g. 8x128 (overrides --quick); with --rerank "
                             "DOCUMENTSxTOKENS, e.g. 32x200")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell and engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="*", default=None, help="subset of engine names")
    parser.add_argument("--preset", default="0.6B",
                        help="shape of the random checkpoint (0.6B; tiny for a smoke test)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build and cache every engine's files under --work, then stop")
    parser.add_argument("--peers", action="store_true",
                        help="also time llama.cpp (q8_0, q4_k_m), onnxruntime-genai's graph and "
                             "OpenVINO on the same checkpoint (scripts/bench_peers.py)")
    parser.add_argument("--onnx", nargs="*", default=[], metavar="NAME=PATH",
                        help="also time these ONNX graphs of the same checkpoint as engine "
                             "onnx-NAME (e.g. an int8 exported with another --target)")
    parser.add_argument("--sweep", action="store_true",
                        help="length sweep instead of the grid: one text per length, each "
                             "engine in its own process (scripts/bench_lengths.py)")
    parser.add_argument("--lengths", nargs="*", type=int, default=None,
                        help="sweep lengths (default 128 512 2048 8192 32768)")
    parser.add_argument("--sweep-engines", nargs="*", default=None,
                        help="sweep engines (default: torch, ours fp32/int8/int4, llama.cpp "
                             "q8_0, OpenVINO fp32)")
    parser.add_argument("--frontier", action="store_true",
                        help="speed-fidelity frontier of int8/int4 plans and peers per fixture "
                             "(scripts/bench_frontier.py)")
    parser.add_argument("--fixture", nargs="*", default=None,
                        help="frontier fixtures (default: all of bench_frontier.FIXTURES)")
    parser.add_argument("--rerank", action="store_true",
                        help="the reranker cells instead (scripts/bench_rerank.py)")
    parser.add_argument("--rerank-engines", nargs="*", default=None,
                        help="only these reranker engines (torch-card, torch-last, ours-PRECISION, "
                             "llama.cpp-q8_0); the first is the score reference")
    args = parser.parse_args()
    extra = {}
    for item in args.onnx:
        name, _, path = item.partition("=")
        if not name or not Path(path).is_file():
            parser.error(f"--onnx {item!r}: write NAME=PATH to an existing .onnx file")
        extra[f"onnx-{name}"] = Path(path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    if args.frontier:
        from bench_frontier import CELLS, FIXTURES
        from bench_frontier import run as frontier

        cells = ([tuple(int(n) for n in c.lower().split("x")) for c in args.cells]
                 if args.cells else list(CELLS))
        frontier(args.work, out, args.fixture or list(FIXTURES), cells, args.threads, args.runs,
                 peers=True)
        return

    if args.rerank:
        from bench_rerank import run as rerank_cells

        cells = ([tuple(int(n) for n in c.lower().split("x")) for c in args.cells]
                 if args.cells else None)
        rerank_cells(args.work, out, args.threads, args.runs, args.preset, cells=cells,
                     only=args.rerank_engines)
        return

    if args.sweep:
        from bench_lengths import ENGINES, LENGTHS, sweep
        from bench_peers import build_peers

        checkpoint, _, files = prepare(args.work, args.preset, fixed_recipes=False)
        wanted = args.sweep_engines or list(ENGINES)
        if any(not e.startswith(("torch-", "onnx-")) for e in wanted):
            files |= build_peers(checkpoint, files["onnx-fp32"], args.work, args.preset,
                                 genai="genai-fp32" in wanted)[0]
        sweep(args.work, out, checkpoint, files, args.lengths or list(LENGTHS), wanted,
              args.threads)
        return

    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    from qwen3emb.runtime.session import open_session

    torch.set_num_threads(args.threads)
    checkpoint, _, files = prepare(args.work, args.preset)
    peer_files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    if args.peers:
        from bench_peers import build_peers

        peer_files, skipped = build_peers(checkpoint, files["onnx-fp32"], args.work, args.preset)
    if args.prepare_only:
        logging.info("prepared %d engines under %s", len(files) + len(peer_files), args.work)
        return
    if args.engines:
        files = {k: v for k, v in files.items() if k in args.engines}
        peer_files = {k: v for k, v in peer_files.items() if k in args.engines}
        skipped = {k: v for k, v in skipped.items() if k in args.engines}
    files.update(extra)
    engines: dict[str, Any] = {}
    load_rss: dict[str, int] = {}
    before = rss()
    engines["torch-fp32"] = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    load_rss["torch-fp32"] = rss() - before
    for name, path in files.items():
        gc.collect()
        before = rss()
        # As the runtime loads it: int8 codes on the fastest exact kernel of this CPU.
        engines[name] = open_session(path, "cpu", args.threads)
        load_rss[name] = rss() - before
    for name, path in peer_files.items():
        from bench_peers import load_peer

        gc.collect()
        before = rss()
        try:
            engines[name] = load_peer(name, path, args.threads)
        except Exception as e:  # noqa: BLE001 - a peer that cannot load is reported, not fatal
            skipped[name] = f"could not load: {str(e).strip().splitlines()[-1][:200]}"
            continue
        load_rss[name] = rss() - before
        files[name] = path
    for name, reason in skipped.items():
        logging.warning("skipped %s: %s", name, reason)
    sizes = {name: size_of(path) for name, path in files.items()}
    sizes["torch-fp32"] = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))

    def run(name: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return embed_with(engines[name], name, ids, mask, peer=name in peer_files)

    # Other processes on the machine slow torch more than onnxruntime: record the load.
    load_start = os.getloadavg()[0]
    cells = QUICK_CELLS if args.quick else [(b, s) for b in GRID_BATCH for s in GRID_LENGTH]
    if args.cells:
        cells = [tuple(int(n) for n in cell.lower().split("x")) for cell in args.cells]
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    for batch, length in cells:
        ids = rng.integers(0, 151643, (batch, length), dtype=np.int64)
        ids[:, -1] = 151643  # the end token, as the tokenizer appends it
        mask = np.ones_like(ids)
        times: dict[str, list[float]] = {n: [] for n in engines}
        outputs: dict[str, np.ndarray] = {}
        peaks: dict[str, int] = {n: 0 for n in engines}
        for name in engines:  # warm-up
            outputs[name] = run(name, ids, mask)
        for _ in range(args.runs):
            for name in engines:
                before_run = rss()
                with PeakRss() as peak:
                    start = time.perf_counter()
                    run(name, ids, mask)
                    times[name].append(time.perf_counter() - start)
                # Growth during this engine's own run (arenas kept from earlier runs excluded).
                peaks[name] = max(peaks[name], peak.peak - before_run)
        reference = outputs["torch-fp32"]
        for name in engines:
            p50 = float(np.median(times[name]))
            cos = (outputs[name] * reference).sum(axis=1) / (
                np.linalg.norm(outputs[name], axis=1) * np.linalg.norm(reference, axis=1))
            results.append({
                "engine": name, "batch": batch, "length": length, "p50_s": round(p50, 4),
                "min_s": round(float(np.min(times[name])), 4),
                "tokens_per_s": round(batch * length / p50, 1),
                "speedup_vs_torch": None,
                "load_rss_mb": round(load_rss[name] / 2**20),
                "run_rss_growth_mb": round(peaks[name] / 2**20),
                "size_mb": round(sizes[name] / 2**20, 1),
                "min_cosine_to_torch": round(float(np.min(cos)), 6),
            })
            logging.info("b=%d s=%d %-26s p50 %.3fs  %.0f tok/s  cos %.6f", batch, length, name,
                         p50, batch * length / p50, float(np.min(cos)))
        def p50_of(engine: str, batch: int = batch, length: int = length) -> float:
            return next(r["p50_s"] for r in results if r["engine"] == engine
                        and r["batch"] == batch and r["length"] == length)

        torch_p50 = p50_of("torch-fp32")
        for r in results:
            if r["batch"] == batch and r["length"] == length:
                r["speedup_vs_torch"] = round(torch_p50 / r["p50_s"], 2)
        if "onnx-fp32" in files:
            feed = {"input_ids": ids, "attention_mask": mask}
            gemm_s = gemm_time(files["onnx-fp32"], feed, args.threads)
            floor = {"batch": batch, "length": length, "onnx_fp32_gemm_s": round(gemm_s, 4),
                     "onnx_fp32_p50_s": p50_of("onnx-fp32"), "torch_p50_s": torch_p50,
                     "fp32_ceiling_vs_torch": round(torch_p50 / gemm_s, 2)}
            logging.info("b=%d s=%d fp32 ONNX GEMM kernels %.3fs of its p50: fp32 ONNX can "
                         "reach at most %.2fx torch", batch, length, gemm_s,
                         torch_p50 / gemm_s)
            if "onnx-int8-searched" in files:
                int8_s = gemm_time(files["onnx-int8-searched"], feed, args.threads,
                                   ops=INT8_GEMM_OPS)
                floor.update({"onnx_int8_gemm_s": round(int8_s, 4),
                              "onnx_int8_p50_s": p50_of("onnx-int8-searched"),
                              "int8_ceiling_vs_torch": round(torch_p50 / int8_s, 2)})
                logging.info("b=%d s=%d int8 ONNX GEMM kernels %.3fs: the searched int8 can "
                             "reach at most %.2fx torch", batch, length, int8_s,
                             torch_p50 / int8_s)
            floors.append(floor)
    meta = {"threads": args.threads, "runs": args.runs, "cpu_count": os.cpu_count(),
            "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()[0],
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "preset": args.preset, "skipped": skipped,
            "note": "round-robin timing in one process; p50 of the timed runs after 1 warm-up"}
    if args.peers:
        meta["peers"] = peer_versions()
    (out / "bench.json").write_text(json.dumps({"meta": meta, "results": results,
                                                "fp32_ceiling": floors}, indent=2))
    (out / "bench.md").write_text(markdown(results, meta, floors))
    chart(results, out / "bench.png")
    print(markdown(results, meta, floors))


def peer_versions() -> dict[str, str]:
    """Installed versions of the peer engines' packages ("not installed" when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("llama_cpp_python", "onnxruntime-genai", "openvino"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def markdown(results: list[dict[str, Any]], meta: dict[str, Any],
             floors: list[dict[str, Any]] = ()) -> str:
    head = ("| batch | length | engine | tokens/s | p50 s | × torch | min cos to torch | "
            "size MB | load RSS MB | peak RSS growth in run MB |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {r['batch']} | {r['length']} | {r['engine']} | {r['tokens_per_s']:.0f} | "
        f"{r['p50_s']:.3f} | {r['speedup_vs_torch']:.2f} | {r['min_cosine_to_torch']:.6f} | "
        f"{r['size_mb']:.0f} | {r['load_rss_mb']} | {r['run_rss_growth_mb']} |\n"
        for r in results)
    load = ""
    if "load_average_at_start" in meta:
        load = (f", 1-min load average {meta['load_average_at_start']:.1f} at start and "
                f"{meta['load_average_at_end']:.1f} at end on {meta['cpu_count']} cores")
    floor = ""
    if floors:
        int8 = all("int8_ceiling_vs_torch" in f for f in floors)
        floor = ("\n\nCeilings: time of the GEMM kernels (fp32: MatMul, FusedMatMul; int8: "
                 "also MatMulIntegerToFloat, DynamicQuantizeMatMul, MatMulInteger, MatMulNBits; "
                 "onnxruntime profiler, 2 runs) — a graph cannot run faster even if every "
                 "other node took no time.\n\n"
                 "| batch | length | fp32 ONNX GEMM kernels s | fp32 ONNX p50 s | torch p50 s | "
                 "fp32 ceiling × torch |" + (" int8 GEMM kernels s | int8 p50 s | int8 ceiling "
                                             "× torch |" if int8 else "")
                 + "\n|---|---|---|---|---|---|" + ("---|---|---|" if int8 else "") + "\n"
                 + "".join(
                     f"| {f['batch']} | {f['length']} | {f['onnx_fp32_gemm_s']:.3f} | "
                     f"{f['onnx_fp32_p50_s']:.3f} | {f['torch_p50_s']:.3f} | "
                     f"{f['fp32_ceiling_vs_torch']:.2f} |"
                     + (f" {f['onnx_int8_gemm_s']:.3f} | {f['onnx_int8_p50_s']:.3f} | "
                        f"{f['int8_ceiling_vs_torch']:.2f} |" if int8 else "") + "\n"
                     for f in floors))
    peers = ""
    if meta.get("peers"):
        peers = ", " + ", ".join(f"{k} {v}" for k, v in meta["peers"].items())
    if meta.get("preset", "0.6B") != "0.6B":
        peers += f"; random checkpoint of preset {meta['preset']}"
    skipped = "".join(f"\n\nSkipped {name}: {reason}" for name, reason
                      in meta.get("skipped", {}).items())
    return (f"{meta['threads']} intra-op threads, {meta['runs']} timed runs per cell "
            f"(round-robin), onnxruntime {meta['onnxruntime']}, torch {meta['torch']}"
            f"{peers}{load}\n\n" + head + rows + floor + skipped)


def chart(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed; no chart")
        return
    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for engine in sorted({r["engine"] for r in results}):
            rows = sorted((r for r in results if r["engine"] == engine and r["batch"] == batch),
                          key=lambda r: r["length"])
            if rows:
                ax.plot([r["length"] for r in rows], [r["tokens_per_s"] for r in rows],
                        marker="o", label=engine)
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
