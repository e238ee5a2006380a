"""Length sweep: time, peak RSS and cosine per engine for one text of 128 to 32768 tokens.

``python scripts/bench.py --sweep`` runs this (it is the sweep mode of the benchmark). Each
(engine, length) cell runs in a fresh process, so its peak RSS (``getrusage``) is its own:
the engine's load plus its one forward pass. Engines: HF torch fp32 (sdpa, the reference),
our fp32 / int8 / int4 graphs, llama.cpp on our q8_0 GGUF (flash attention as llama.cpp
chooses it) and OpenVINO compiling our fp32 graph. ``ENGINE@openvino`` (e.g.
``onnx-int8-searched@openvino``) runs one of our graphs on the runtime's ``openvino`` provider,
as ``-p openvino`` serves it. The same random ids (the real vocabulary,
end token last) feed every engine; cosines are to torch's vector for the same length.

    python scripts/bench.py --work /tmp/bench --sweep
    python scripts/bench.py --work /tmp/bench --sweep --lengths 2048 8192 \\
        --sweep-engines torch-fp32 onnx-fp32 onnx-int8-searched onnx-int8-searched@openvino
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.progress import peak_rss_bytes

LENGTHS = (128, 512, 2048, 8192, 32768)
ENGINES = ("torch-fp32", "onnx-fp32", "onnx-int8-searched", "onnx-int4-searched",
           "llama.cpp-q8_0", "openvino-fp32")
END_TOKEN_ID = 151643


def sweep_ids(length: int) -> np.ndarray:
    """[1, length] random ids of the real vocabulary, end token last (fixed seed)."""
    ids = np.random.default_rng(length).integers(0, END_TOKEN_ID, (1, length), dtype=np.int64)
    ids[:, -1] = END_TOKEN_ID
    return ids


def run_cell(engine: str, path: Path, checkpoint: Path, length: int, threads: int,
             out: Path) -> None:
    """In a fresh process: load ``engine``, embed the sweep text of ``length`` tokens (twice
    below 2048 tokens, timing the second), write the vector and the figures to ``out``."""
    ids = sweep_ids(length)
    mask = np.ones_like(ids)
    start = time.perf_counter()
    embed = load_engine(engine, path, checkpoint, threads)
    load_s = time.perf_counter() - start
    if length < 2048:
        embed(ids, mask)
    start = time.perf_counter()
    vector = embed(ids, mask)
    seconds = time.perf_counter() - start
    np.save(out.with_suffix(".npy"), np.asarray(vector, np.float32).reshape(1, -1))
    peak = peak_rss_bytes()
    out.write_text(json.dumps({"engine": engine, "length": length, "seconds": seconds,
                               "load_s": load_s, "peak_rss_bytes": peak}))


def load_engine(engine: str, path: Path, checkpoint: Path, threads: int) -> Any:
    """``embed(ids, mask) -> [1, dim]`` for one engine."""
    if engine == "torch-fp32":
        import torch
        from transformers import AutoModel

        torch.set_num_threads(threads)
        model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32,
                                          attn_implementation="sdpa").eval()

        def embed_torch(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                hidden = model(input_ids=torch.from_numpy(ids),
                               attention_mask=torch.from_numpy(mask)).last_hidden_state
            vec = hidden[:, -1].float()
            return (vec / vec.norm(dim=-1, keepdim=True)).numpy()

        return embed_torch
    if engine.endswith("@openvino"):
        from qwen3emb.runtime.session import open_session

        session = open_session(path, "openvino", threads)
        return lambda ids, mask: session.run(
            ["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    if engine.startswith("onnx-"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(os.fspath(path), options,
                                       providers=["CPUExecutionProvider"])
        return lambda ids, mask: session.run(
            ["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_peers import load_peer

    return load_peer(engine, path, threads)


def sweep(work: Path, out: Path, checkpoint: Path, files: dict[str, Path],
          lengths: list[int], engines: list[str], threads: int,
          timeout: int = 5400) -> list[dict[str, Any]]:
    """Every (engine, length) cell in its own process; returns the rows, also written to
    ``out/sweep.json`` and ``out/sweep.md`` as they come."""
    rows: list[dict[str, Any]] = []
    files = {"torch-fp32": checkpoint, **files}
    files |= {e: files[e.removesuffix("@openvino")] for e in engines
              if e.endswith("@openvino") and e.removesuffix("@openvino") in files}
    cells = out / "sweep-cells"
    cells.mkdir(parents=True, exist_ok=True)
    for length in lengths:
        reference = None
        for engine in engines:
            if engine not in files:
                logging.warning("skipping %s: not prepared", engine)
                continue
            record = cells / f"{engine}-{length}.json"
            if not record.is_file():
                command = [sys.executable, __file__, "--cell", engine, str(files[engine]),
                           str(checkpoint), str(length), str(threads), str(record)]
                logging.info("sweep: %s at %d tokens", engine, length)
                try:
                    done = subprocess.run(command, timeout=timeout, capture_output=True,
                                          text=True)
                except subprocess.TimeoutExpired:
                    rows.append({"engine": engine, "length": length,
                                 "error": f"over {timeout} s"})
                    continue
                if done.returncode != 0 or not record.is_file():
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
                    rows.append({"engine": engine, "length": length,
                                 "error": f"exit {done.returncode}: {tail[0][:200]}"})
                    logging.warning("%s at %d failed: %s", engine, length, tail[0][:200])
                    continue
            row = json.loads(record.read_text())
            vector = np.load(record.with_suffix(".npy"))
            if engine == "torch-fp32":
                reference = vector
            row["cosine_to_torch"] = (None if reference is None else
                                      round(float((vector * reference).sum()), 6))
            rows.append(row)
            logging.info("%-20s %6d tokens: %8.2f s  peak %.2f GB  cos %s", engine, length,
                         row["seconds"], row["peak_rss_bytes"] / 1e9, row["cosine_to_torch"])
        (out / "sweep.json").write_text(json.dumps(rows, indent=1))
        (out / "sweep.md").write_text(markdown(rows, lengths, engines))
    return rows


def markdown(rows: list[dict[str, Any]], lengths: list[int], engines: list[str]) -> str:
    """One row per engine, one column per length: time (× torch) / peak RSS / cosine."""
    cell = {(r["engine"], r["length"]): r for r in rows}
    lines = ["| engine | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for engine in engines:
        parts = []
        for length in lengths:
            row = cell.get((engine, length))
            torch_row = cell.get(("torch-fp32", length))
            if row is None:
                parts.append("")
            elif "error" in row:
                parts.append(f"failed ({row['error'][:40]})")
            else:
                ratio = ("" if torch_row is None or "seconds" not in torch_row
                         or engine == "torch-fp32"
                         else f" ({torch_row['seconds'] / row['seconds']:.2f}×)")
                cos = "" if row["cosine_to_torch"] is None else f" / {row['cosine_to_torch']:.6f}"
                parts.append(f"{row['seconds']:.2f} s{ratio} / "
                             f"{row['peak_rss_bytes'] / 1e9:.2f} GB{cos}")
        lines.append(f"| {engine} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "--cell":
    _, _, name, artifact, ckpt, n, t, record_path = sys.argv
    run_cell(name, Path(artifact), Path(ckpt), int(n), int(t), Path(record_path))
