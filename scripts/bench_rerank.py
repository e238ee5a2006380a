"""Reranker speed: pairs/s of HF torch fp32 (the model card's recipe) and of our reranker bundle.

Random weights in the real 0.6B reranker shape (tied head, as released), 2 threads, one process;
every engine scores the same token ids (prompt prefix + random content + suffix), so the cells
are exactly the sizes they name:

- 1 query x 32 documents of ~200 content tokens;
- 1 query x 8 documents of ~1000 content tokens.

Engines: ``torch-card`` (``AutoModelForCausalLM`` forward as the model card calls it: the logits
of every position over the whole vocabulary, then the last position's yes/no), ``torch-last``
(the same model with ``logits_to_keep=1``, what a careful user would write), and ours
(``Reranker.score_ids``) in each precision of the bundle, and ``llama.cpp-q8_0``: llama.cpp's
rank pooling on our q8_0 GGUF (``GGUFReranker.score_ids``, the same ids). Columns: seconds per
cell, pairs/s, x torch-card, max |score - torch-card score|.
Run as ``python scripts/bench.py --rerank``.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

CELLS = ((32, 200), (8, 1000))
"""(documents, content tokens per document), one query each."""


def prepare(work: Path, preset: str = "0.6B") -> tuple[Path, Path, Path]:
    """The random reranker checkpoint, its fp32/int8/int4 bundle and its q8_0 GGUF bundle
    (cached under ``work``)."""
    from qwen3emb.convert.random_checkpoint import REAL_VOCAB_SIZE, build_random_reranker
    from qwen3emb.pipeline import export_bundle

    checkpoint, bundle = work / f"reranker-checkpoint-{preset}", work / f"reranker-bundle-{preset}"
    if not (checkpoint / "config.json").is_file():
        logging.info("building the random %s reranker checkpoint", preset)
        build_random_reranker(checkpoint, preset=preset, tied=True, vocab_size=REAL_VOCAB_SIZE)
    if not (bundle / "manifest.json").is_file():
        logging.info("exporting the reranker fp32/int8/int4 (searched; several minutes)")
        export_bundle(checkpoint, bundle, task="rerank", validate=False, force=True,
                      precisions=["int8", "int4"])
    gguf = work / f"reranker-gguf-{preset}"
    if not (gguf / "manifest.json").is_file():
        logging.info("writing the reranker's q8_0 GGUF")
        export_bundle(checkpoint, gguf, task="rerank", validate=False, force=True,
                      formats=["gguf"], gguf_types=["q8_0"])
    return checkpoint, bundle, gguf


def cell_ids(prompt: Any, documents: int, tokens: int, vocab: int, seed: int = 0
             ) -> list[list[int]]:
    """Pairs of ``tokens`` random content ids between the reranker's prefix and suffix."""
    rng = np.random.default_rng(seed + documents * 7919 + tokens)
    return [prompt.prefix_ids + rng.integers(0, vocab, tokens).tolist() + prompt.suffix_ids
            for _ in range(documents)]


def run(work: Path, out: Path, threads: int, runs: int, preset: str = "0.6B",
        cells: list[tuple[int, int]] | None = None, only: list[str] | None = None) -> list[dict]:
    """Time the engines (``only``: these, the first one the score reference; default all) on
    each (documents, content tokens) cell (default :data:`CELLS`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen3emb.manifest import read_manifest
    from qwen3emb.runtime import GGUFReranker, Reranker

    torch.set_num_threads(threads)
    checkpoint, bundle, gguf = prepare(work, preset)
    manifest = read_manifest(bundle)
    precisions = sorted(manifest.models("onnx"), key=["fp32", "fp16", "int8", "int4"].index)
    ours = {p: Reranker(bundle, precision=p, threads=threads) for p in precisions}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    yes, no = manifest.rerank["yes_token_id"], manifest.rerank["no_token_id"]
    vocab = min(int(manifest.tokenizer["end_token_id"]), 151643)

    def torch_scores(ids: list[list[int]], keep: int) -> np.ndarray:
        width = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), width), manifest.tokenizer["pad_token_id"])
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):  # left padding, as the card's tokenizer
            input_ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        with torch.inference_mode():
            last = model(input_ids=input_ids, attention_mask=mask,
                         logits_to_keep=keep).logits[:, -1, :]
        return torch.sigmoid(last[:, yes] - last[:, no]).double().numpy()

    engines = {"torch-card": lambda ids: torch_scores(ids, 0),
               "torch-last": lambda ids: torch_scores(ids, 1)}
    engines |= {f"ours-{p}": (lambda ids, r=r: r.score_ids(ids, batch_size=len(ids)))
                for p, r in ours.items()}
    llama = GGUFReranker(gguf, gguf_type="q8_0", n_threads=threads)
    engines["llama.cpp-q8_0"] = lambda ids: llama.score_ids(ids, batch_size=len(ids))
    if only:
        unknown = sorted(set(only) - set(engines))
        if unknown:
            raise SystemExit(f"unknown reranker engines {unknown}; choose from {list(engines)}")
        engines = {name: engines[name] for name in only}
    rows = []
    for documents, tokens in cells or CELLS:
        ids = cell_ids(ours[precisions[0]].prompt, documents, tokens, vocab)
        reference = None
        for name, engine in engines.items():
            gc.collect()
            scores = engine(ids)  # warm-up
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                scores = engine(ids)
                times.append(time.perf_counter() - start)
            if reference is None:
                reference = np.asarray(scores, dtype=np.float64)
            best = min(times)
            rows.append({"cell": f"1 x {documents} x {tokens}", "engine": name,
                         "seconds": round(best, 3), "pairs_per_s": round(documents / best, 2),
                         "max_abs_score_diff": float(np.abs(np.asarray(scores) - reference).max())})
            logging.info("%s %s: %.2f s", rows[-1]["cell"], name, best)
        cell = [r for r in rows if r["cell"] == rows[-1]["cell"]]
        base = {r["engine"]: r["seconds"] for r in cell}
        for r in cell:
            for key in ("torch-card", "torch-last"):
                r[f"x_{key.replace('-', '_')}"] = (round(base[key] / r["seconds"], 2)
                                                   if key in base else None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rerank.json").write_text(json.dumps({"threads": threads, "runs": runs,
                                                 "preset": preset, "rows": rows}, indent=2))
    (out / "rerank.md").write_text(markdown(rows), encoding="utf-8")
    print(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| cell (query x docs x tokens) | engine | s | pairs/s | x torch-card | "
             "x torch-last | max abs score diff to torch |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['engine']} | {r['seconds']} | {r['pairs_per_s']} | "
              f"{r['x_torch_card']} | {r['x_torch_last']} | {r['max_abs_score_diff']:.2e} |"
              for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--preset", default="0.6B")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    run(args.work, args.out or args.work, args.threads, args.runs, args.preset)
