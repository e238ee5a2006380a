"""Throughput of ``embed-corpus`` against a plain ``TextEmbedder.encode`` loop on the same texts.

Writes a synthetic Parquet corpus (seeded, so every run embeds the same texts), runs the
``embed-corpus`` CLI on it in one command (a subprocess with its own local Ray, as a user runs
it), then the loop, and prints rows/s, tokens/s and their ratio with the machine's load before and
after each part. The job's time is end to end (hash check of the bundle, Ray start, actors
loading the bundle, reading, writing); the loop's time covers ``encode`` only (the bundle is
loaded before the clock starts), so the ratio charges the engine with all its overhead.

    python scripts/bench_corpus.py --bundle /tmp/q06/bundle --precision int8 --rows 10000
    python scripts/bench_corpus.py --bundle qwen3emb-demo/bundle --rows 100000 --loop-rows 10000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when "
         "if so no will can more other its into some could them than then may these about "
         "system data model search index query vector document passage embedding retrieval "
         "language network training corpus cluster memory storage engine latency throughput "
         "river mountain city history music science market energy health water forest").split()


def make_texts(n: int, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    """``n`` pseudo-English passages of ``min_words``..``max_words`` words (seeded)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
            for _ in range(n)]


def write_corpus(path: Path, texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts}),
                   path, row_group_size=8192)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_corpus(args: argparse.Namespace, corpus: Path, out: Path) -> dict[str, object]:
    """The CLI in a subprocess; figures from OUT/_manifest.json plus the wall time."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", "from qwen3emb.cli import main; main()", "embed-corpus",
               str(args.bundle), str(corpus), "-o", str(out), "--precision", args.precision,
               "--batch-size", str(args.batch_size), "--no-progress"]
    for flag, value in (("--actors", args.actors), ("--threads-per-actor", args.threads),
                        ("--unit-rows", args.unit_rows)):
        if value:
            command += [flag, str(value)]
    before = load()
    start, start_epoch = time.perf_counter(), time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"embed-corpus failed ({done.returncode}):\n{done.stderr}")
    manifest = json.loads((out / "_manifest.json").read_text())
    run = manifest["runs"][-1]
    # Steady state: rows of every unit but the first over the time between the first commit
    # and the last (no Ray start, no actor start, no first unit).
    markers = sorted((json.loads(p.read_text()) for p in (out / "_done").glob("*.json")),
                     key=lambda m: m["committed"])
    span = markers[-1]["committed"] - markers[0]["committed"]
    steady = sum(m["rows"] for m in markers[1:]) / span if span > 0 else None
    return {"rows": run["rows"], "tokens": run["tokens"], "seconds": run["seconds"],
            "wall_seconds": round(wall, 1), "rows_per_second": run["rows_per_second"],
            "tokens_per_second": run["tokens_per_second"],
            "steady_rows_per_second": round(steady, 2) if steady else None,
            "first_commit_after_s": round(markers[0]["committed"] - start_epoch, 1),
            "units": len(markers), "where": run["where"], "actors": run["actors"],
            "threads_per_actor": run["threads_per_actor"], "load_before": before,
            "load_after": load(), "summary": done.stdout.strip()}


def run_loop(args: argparse.Namespace, texts: list[str]) -> dict[str, object]:
    """``encode`` over the texts in chunks of ``--chunk`` rows, after loading the bundle."""
    from qwen3emb.runtime import TextEmbedder

    before = load()
    loaded = time.perf_counter()
    embedder = TextEmbedder(args.bundle, precision=args.precision, threads=args.loop_threads)
    start = time.perf_counter()
    chunk = args.unit_rows or 1024  # embed-corpus's unit: the same batches as the job
    for i in range(0, len(texts), chunk):
        embedder.encode(texts[i:i + chunk], batch_size=args.batch_size)
    end = time.perf_counter()
    seconds, with_load = end - start, end - loaded
    tokens = sum(len(x) for x in embedder.tokenize(texts))
    return {"rows": len(texts), "tokens": tokens, "seconds": round(seconds, 1),
            "seconds_with_load": round(with_load, 1),
            "rows_per_second": round(len(texts) / seconds, 2),
            "rows_per_second_with_load": round(len(texts) / with_load, 2),
            "tokens_per_second": round(tokens / seconds, 1),
            "threads": args.loop_threads or "onnxruntime default",
            "load_before": before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rows", type=int, default=10_000, help="rows in the corpus")
    parser.add_argument("--loop-rows", type=int, default=None,
                        help="rows for the encode loop (default: all; its first N rows)")
    parser.add_argument("--min-words", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--unit-rows", type=int, default=None,
                        help="embed-corpus --unit-rows; also the loop's texts per encode call")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="threads per actor")
    parser.add_argument("--loop-threads", type=int, default=None)
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_corpus"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    texts = make_texts(args.rows, min_words=args.min_words, max_words=args.max_words)
    corpus = args.work / f"corpus-{args.rows}-{args.min_words}-{args.max_words}.parquet"
    if not corpus.exists():
        write_corpus(corpus, texts)
    result: dict[str, object] = {"bundle": str(args.bundle), "precision": args.precision,
                                 "rows": args.rows, "batch_size": args.batch_size,
                                 "cpus": os.cpu_count()}
    loop_rows = texts[:args.loop_rows or len(texts)]
    # The loop runs before and after the job, so that a change in the machine's load during
    # the measurement shows up instead of biasing the ratio.
    loops = [] if args.skip_loop else [run_loop(args, loop_rows)]
    result["embed_corpus"] = job = run_corpus(args, corpus, args.work / "out")
    print(f"embed-corpus: {job['rows']} rows in {job['seconds']} s -> "
          f"{job['rows_per_second']} rows/s, {job['tokens_per_second']} tokens/s "
          f"(steady {job['steady_rows_per_second']} rows/s after the first commit at "
          f"{job['first_commit_after_s']} s; {job['actors']} actors x "
          f"{job['threads_per_actor']} threads; load {job['load_before']} -> "
          f"{job['load_after']})", flush=True)
    if loops:
        loops.append(run_loop(args, loop_rows))
        result["encode_loop"] = loops
        for name, loop in zip(("before", "after"), loops):
            print(f"encode loop ({name}): {loop['rows']} rows in {loop['seconds']} s -> "
                  f"{loop['rows_per_second']} rows/s, {loop['tokens_per_second']} tokens/s "
                  f"({loop['rows_per_second_with_load']} rows/s counting the bundle load; "
                  f"load {loop['load_before']} -> {loop['load_after']})")
        mean = sum(float(x["rows_per_second"]) for x in loops) / 2  # type: ignore[arg-type]
        steady = job["steady_rows_per_second"]
        result["ratio_rows_per_second"] = round(float(job["rows_per_second"]) / mean, 3)  # type: ignore[arg-type]
        result["ratio_steady"] = round(float(steady) / mean, 3) if steady else None  # type: ignore[arg-type]
        print(f"ratio embed-corpus / mean of the loops: {result['ratio_rows_per_second']} end to "
              f"end, {result['ratio_steady']} steady")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
