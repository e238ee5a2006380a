"""Speed-fidelity frontier of int8/int4 on one checkpoint (``scripts/bench.py --frontier``).

For each fixture in the real 0.6B shape (random weights with one trait of real checkpoints
planted: ``qwen3emb.convert.hard_checkpoints``, or the plain N(0, 0.05) deep stack), this exports
the bundle (fp32 + searched int8 + int4, cached under ``--work``), writes the candidates the
search chooses between as whole-graph plans (every MatMul one tier of
``qwen3emb.export.quant.planned.TIERS``), builds the peers on the same weights (OpenVINO fp32 /
NNCF weight-only int8 / NNCF full int8 on our fp32 graph, llama.cpp q8_0 / q4_k_m on our GGUF;
``scripts/bench_peers.py``), and times every engine round-robin against HF torch fp32 in one
process. Fidelity is the min cosine to torch over the timed inputs (random tokens, never the
calibration texts). Our engines load as the runtime loads them (``open_session``: int8 codes on
the fastest exact kernel of this CPU), and in a second pass on the ``openvino`` provider
(OpenVINO compiling our integer graphs: ``<graph>@openvino``; torch timed again in that pass).

Writes ``frontier.json``, ``frontier.md`` and ``frontier.png`` (min cosine against x torch) to
``--out``.

    python scripts/bench.py --frontier --work /tmp/frontier
    python scripts/bench.py --frontier --work /tmp/frontier --fixture normal --cells 8x128
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = ("deep-high-variance", "normal", "massive-activations", "outlier-embeddings")
UNIFORM = ("int8", "int8-row", "nbits8", "nbits8-128", "int4")
"""Whole-graph plans: every weight MatMul on one tier (int4: the recipe's start plan)."""
CELLS = ((8, 128), (1, 16))
END_TOKEN = 151643


def checkpoint_for(work: Path, fixture: str) -> Path:
    ckpt = work / f"ckpt-{fixture}"
    if (ckpt / "config.json").is_file():
        return ckpt
    if fixture == "deep-high-variance":
        from qwen3emb.convert.random_checkpoint import write_random_shards

        write_random_shards(ckpt, preset="0.6B", initializer_range=0.05)
    else:
        from qwen3emb.convert.hard_checkpoints import build_hard_checkpoint

        build_hard_checkpoint(ckpt, fixture, preset="0.6B")
    return ckpt


def bundle_for(work: Path, fixture: str, checkpoint: Path, precision: str
               ) -> tuple[Path | None, dict[str, Any]]:
    """The exported bundle of one searched precision (fp32 beside it), cached, and the
    export's figures; ``None`` with the export's one-line error where the search refused."""
    from qwen3emb.errors import Qwen3EmbError
    from qwen3emb.pipeline import export_bundle

    bundle = work / f"bundle-{fixture}-{precision}"
    facts = work / f"bundle-{fixture}-{precision}.json"
    if not facts.is_file():
        start = time.perf_counter()
        try:
            export_bundle(checkpoint, bundle, validate=False, force=True,
                          precisions=[precision])
            found: dict[str, Any] = {}
        except Qwen3EmbError as e:
            found = {"refused": e.one_line()}
        facts.write_text(json.dumps({"export_s": round(time.perf_counter() - start, 1),
                                     **found}))
    found = json.loads(facts.read_text())
    return (None if "refused" in found else bundle), found


def uniform_graphs(work: Path, fixture: str, source: Path, checkpoint: Path) -> dict[str, Path]:
    """One graph per :data:`UNIFORM` tier (cached)."""
    from qwen3emb.export.onnx.lazy import LazyGraph
    from qwen3emb.export.quant import planned
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.ops import weight_matmuls
    from qwen3emb.export.quant.precisions import calibration_feeds
    from qwen3emb.export.quant.quantize import DEFAULT_INT8_SCHEME

    paths = {t: work / f"plan-{fixture}-{t}" / "model.onnx" for t in UNIFORM}
    missing = [t for t, p in paths.items() if not p.is_file()]
    if missing:
        calibration = calibrate(source, calibration_feeds(checkpoint / "tokenizer.json"))
        names = [n.name for n in weight_matmuls(LazyGraph(source))]
        for tier in missing:
            if tier == "int4":
                plan = planned.initial_plan(LazyGraph(source), "int4", DEFAULT_INT8_SCHEME,
                                            calibration.ranges)
            else:
                plan = dict.fromkeys(names, tier)
            paths[tier].parent.mkdir(parents=True, exist_ok=True)
            logging.info("%s: writing the all-%s graph", fixture, tier)
            planned.build_planned(source, paths[tier], plan, [], calibration.ranges, (), True)
    return paths


def measure(fixture: str, checkpoint: Path, files: dict[str, Path], peers: dict[str, Path],
            cells: list[tuple[int, int]], threads: int, runs: int, provider: str = "cpu"
            ) -> list[dict[str, Any]]:
    """Round-robin timing of torch, our graphs (on ``provider``: onnxruntime's CPU, or
    ``openvino``, whose engines are named ``<graph>@openvino``) and the peers; min cosine to
    torch."""
    import torch
    from bench import embed_with
    from bench_peers import load_peer
    from transformers import AutoModel

    from qwen3emb.runtime.session import open_session

    torch.set_num_threads(threads)
    engines: dict[str, Any] = {"torch-fp32": AutoModel.from_pretrained(
        checkpoint, dtype=torch.float32).eval()}
    suffix = "" if provider == "cpu" else f"@{provider}"
    for name, path in files.items():
        engines[name + suffix] = open_session(path, provider, threads)
    for name, path in peers.items():
        try:
            engines[name] = load_peer(name, path, threads)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            logging.warning("%s: could not load %s: %s", fixture, name, e)

    def run(name: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return embed_with(engines[name], name, ids, mask, peer=name in peers)

    # The hard fixtures keep the 0.6B's layers with a small vocabulary: draw from the
    # checkpoint's own, and end with its own end token.
    config = json.loads((checkpoint / "config.json").read_text())
    end = int(config.get("eos_token_id") or END_TOKEN)
    vocab = min(int(config["vocab_size"]), end)
    rng = np.random.default_rng(1)  # not the calibration texts
    rows = []
    for batch, length in cells:
        ids = rng.integers(0, vocab, (batch, length), dtype=np.int64)
        ids[:, -1] = end
        mask = np.ones_like(ids)
        times: dict[str, list[float]] = {n: [] for n in engines}
        outputs = {n: run(n, ids, mask) for n in engines}  # warm-up, and the outputs
        for _ in range(runs):
            for name in engines:
                start = time.perf_counter()
                run(name, ids, mask)
                times[name].append(time.perf_counter() - start)
        reference = outputs["torch-fp32"]
        base = min(times["torch-fp32"])
        for name in engines:
            vec = outputs[name]
            cos = (vec * reference).sum(1) / (np.linalg.norm(vec, axis=1)
                                              * np.linalg.norm(reference, axis=1))
            rows.append({"fixture": fixture, "cell": f"{batch}x{length}", "engine": name,
                         "ms": round(min(times[name]) * 1e3, 2),
                         "x_torch": round(base / min(times[name]), 3),
                         "min_cosine": round(float(cos.min()), 5)})
            logging.info("%s %s %-22s %7.1f ms  %.2fx torch  min cos %.5f", fixture,
                         rows[-1]["cell"], name, rows[-1]["ms"], rows[-1]["x_torch"],
                         rows[-1]["min_cosine"])
    engines.clear()
    gc.collect()
    return rows


def chart(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        logging.warning("matplotlib is not installed: no chart (pip install matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["fixture"], r["cell"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (fixture, cell) in zip(axes[0], panels):
        for r in rows:
            if (r["fixture"], r["cell"]) != (fixture, cell) or r["engine"] == "torch-fp32":
                continue
            ours = r["engine"].startswith("onnx-")
            on_ov = r["engine"].endswith("@openvino")
            ax.scatter(r["x_torch"], 1 - r["min_cosine"] + 1e-7, marker="o" if ours else "s",
                       color="tab:green" if on_ov else "tab:blue" if ours else "tab:orange")
            ax.annotate(r["engine"].removeprefix("onnx-"), (r["x_torch"],
                                                            1 - r["min_cosine"] + 1e-7),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.01, color="red", linewidth=0.8, linestyle="--")  # the int8 floor
        ax.set_yscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("x torch fp32 (higher is faster)")
        ax.set_ylabel("1 - min cosine to torch (lower is more faithful)")
        ax.set_title(f"{fixture}, {cell} (ours: circles, green on -p openvino; peers: "
                     "squares)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| fixture | cell | engine | ms | x torch | min cosine |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fixture']} | {r['cell']} | {r['engine']} | {r['ms']} | "
                     f"{r['x_torch']} | {r['min_cosine']:.5f} |")
    return "\n".join(lines) + "\n"


def run(work: Path, out: Path, fixtures: list[str], cells: list[tuple[int, int]], threads: int,
        runs: int, peers: bool, openvino: bool = True) -> list[dict[str, Any]]:
    from bench_peers import build_peers

    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for fixture in fixtures:
        checkpoint = checkpoint_for(work, fixture)
        files: dict[str, Path] = {}
        for precision in ("int8", "int4"):
            bundle, facts = bundle_for(work, fixture, checkpoint, precision)
            meta.setdefault(fixture, {})[f"export_{precision}"] = facts
            if bundle is not None:
                files.setdefault("onnx-fp32", bundle / "onnx" / "model.onnx")
                files[f"onnx-{precision}-searched"] = bundle / "onnx" / f"model_{precision}.onnx"
                manifest = json.loads((bundle / "manifest.json").read_text())
                for a in manifest["artifacts"]:
                    if a.get("role") == "model" and a["precision"] == precision:
                        facts["scheme"] = a.get("scheme")
                        facts["speed"] = a.get("settings", {}).get("speed")
        if "onnx-fp32" not in files:
            logging.warning("%s: no bundle exported; skipped", fixture)
            continue
        source = files["onnx-fp32"]
        files |= {f"onnx-all-{t}": p for t, p in uniform_graphs(work, fixture, source,
                                                                checkpoint).items()}
        peer_files: dict[str, Path] = {}
        if peers:
            # onnxruntime-genai's graph is fp32 only: not a point of this chart.
            peer_files, skipped = build_peers(checkpoint, source, work, fixture, genai=False)
            meta[fixture]["skipped_peers"] = skipped
        rows += measure(fixture, checkpoint, files, peer_files, cells, threads, runs)
        if openvino:
            # Our integer graphs compiled by OpenVINO (-p openvino), in a pass of their own:
            # every graph on both engines at once would not fit this machine's memory.
            rows += measure(fixture, checkpoint,
                            {n: p for n, p in files.items() if n != "onnx-fp32"}, {}, cells,
                            threads, runs, provider="openvino")
        (out / "frontier.json").write_text(json.dumps({"rows": rows, "meta": meta,
                                                       "threads": threads}, indent=1))
    (out / "frontier.md").write_text(table(rows))
    chart(rows, out / "frontier.png")
    return rows
