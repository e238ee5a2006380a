#!/usr/bin/env python3
"""Load-test `qwen3emb-export serve` beside the in-process runtime and llama.cpp's own server.

For each server, short and long texts are sent one per request at concurrency 1, 8 and 64;
each cell reports requests/s, p50/p99 latency, tokens/s and errors. The client is a bare
asyncio HTTP/1.1 loop (one keep-alive connection per concurrent worker), so that little of
the machine goes to it. The in-process runtime embeds the same texts without HTTP, set up as
the server runs it (in calls of the server's CPU batch size, and one at a time: its policy
for int8/int4), which gives the server's overhead. llama-cpp-python's OpenAI server
(``python -m llama_cpp.server``, needs ``pip install 'llama-cpp-python[server]'``) serves the
bundle's GGUF when one is there.

    python scripts/load_test.py BUNDLE --precision int8 --gguf-type q8_0 -o docs/serve-load

Writes ``load_test.json`` and ``load_test.md`` to the output directory. Timing on a shared
machine: the script records ``os.getloadavg()`` before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CONCURRENCY = (1, 8, 64)
WORDS = ("river bank money loan water fish boat stream interest rate account deposit flood "
         "bridge city market price trade north south ocean mountain valley forest road").split()


def make_texts(kind: str, count: int, seed: int) -> list[str]:
    """Distinct texts: ``short`` (6-12 words, ~40 tokens with the random checkpoints' small
    BPE) or ``long`` (60-100 words, ~300 tokens)."""
    rng = np.random.default_rng(seed)
    low, high = (6, 13) if kind == "short" else (60, 101)
    return [f"{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))
            for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(host: str, port: int, model: str | None, texts: list[str], concurrency: int,
                pid: int | None = None) -> dict[str, Any]:
    """Send each text as one request, ``concurrency`` keep-alive connections at a time.

    A bare asyncio HTTP/1.1 client: on a small machine that runs both, httpx's own CPU time
    per request (3-5 ms at concurrency 64, measured) would be charged to the server.
    """
    latencies: list[float] = []
    tokens = errors = 0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, tokens, errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while next_index < len(texts):
                text = texts[next_index]
                next_index += 1
                body: dict[str, Any] = {"input": [text], "encoding_format": "float"}
                if model is not None:
                    body["model"] = model
                payload = json.dumps(body).encode()
                start = time.perf_counter()
                writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: bench\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(payload) + payload)
                await writer.drain()
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n")
                              if line.lower().startswith("content-length:"))
                data = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if head.startswith("HTTP/1.1 200"):
                    tokens += int(json.loads(data)["usage"]["prompt_tokens"])
                else:
                    errors += 1
        finally:
            writer.close()

    cpu = cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu if pid else float("nan")
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(texts), "errors": errors,
            "seconds": round(wall, 3), "requests_per_s": round(len(texts) / wall, 2),
            "cpu_ms_per_request": round(cpu / len(texts) * 1000, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "tokens_per_s": round(tokens / wall, 1)}


def run_server(name: str, command: list[str], ready: str, port: int, model: str | None,
               sets: dict[str, list[str]], log: Path) -> list[dict[str, Any]]:
    with open(log, "wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_ready(ready, proc)
        asyncio.run(drive("127.0.0.1", port, model, sets["short"][:8], 4))  # warm-up
        for kind, texts in sets.items():
            for c in CONCURRENCY:
                cell = asyncio.run(drive("127.0.0.1", port, model, texts, c, proc.pid))
                rows.append({"server": name, "texts": kind, **cell})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop(proc)
    return rows


def in_process(bundle: Path, precision: str, sets: dict[str, list[str]],
               threads: int | None) -> list[dict[str, Any]]:
    """The runtime without HTTP, set up as the server runs it (no spin-waiting threads):
    texts/s and tokens/s, in calls of the server's CPU batch size and one at a time."""
    from qwen3emb.runtime import TextEmbedder
    from qwen3emb.serve.settings import CPU_BATCH

    embedder = TextEmbedder(bundle, precision=precision, threads=threads, spinning=False)
    rows = []
    for kind, texts in sets.items():
        tokens = sum(len(ids) for ids in embedder.tokenize(texts))
        embedder.encode(texts[:8])
        for batch in (CPU_BATCH[1], 1):
            cpu, start = time.process_time(), time.perf_counter()
            embedder.encode(texts, batch_size=batch)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            rows.append({"server": f"in-process {precision} (batch {batch})", "texts": kind,
                         "requests": len(texts), "seconds": round(wall, 3),
                         "requests_per_s": round(len(texts) / wall, 2),
                         "cpu_ms_per_request": round(cpu / len(texts) * 1000, 2),
                         "tokens_per_s": round(tokens / wall, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# Load test: `{meta['bundle_name']}`", "",
             f"{meta['machine']}; load average {meta['load_before']} before, "
             f"{meta['load_after']} after. One text per request; texts: {meta['counts']}, "
             f"average tokens {meta['tokens']}. Client: bare asyncio HTTP/1.1, one keep-alive "
             "connection per concurrent worker. In-process: the runtime as the server runs it "
             "(onnxruntime threads not spin-waiting).", "",
             "| server | texts | concurrency | req/s | p50 ms | p99 ms | tokens/s | CPU ms/req "
             "| errors |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['server']} | {r['texts']} | {r.get('concurrency', '-')} | "
                     f"{r['requests_per_s']} | {r.get('p50_ms', '-')} | {r.get('p99_ms', '-')} | "
                     f"{r['tokens_per_s']} | {r['cpu_ms_per_request']} | {r.get('errors', '-')} |")
    if result.get("overhead"):
        lines += ["", "Server overhead at concurrency 64 against the in-process runtime with the "
                  "server's batching policy (its CPU batch size for fp32/fp16, one sequence per "
                  "call for int8/int4), by throughput (1 - server req/s / in-process req/s) and "
                  "by CPU time (1 - in-process CPU per text / server CPU per request; the server's "
                  "process only, not the client's):", ""]
        lines += [f"- {k}: {v['throughput']:.1%} by throughput, {v['cpu']:.1%} by CPU time"
                  for k, v in result["overhead"].items()]
    for note in result.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--precision", action="append", default=None,
                        help="ONNX precision to serve (repeatable; default fp32)")
    parser.add_argument("--gguf-type", default=None, help="GGUF of the bundle for llama.cpp")
    parser.add_argument("--short", type=int, default=256, help="short texts (requests)")
    parser.add_argument("--long", type=int, default=64, help="long texts (requests)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    precisions = args.precision or ["fp32"]
    args.output.mkdir(parents=True, exist_ok=True)
    sets = {"short": make_texts("short", args.short, 0), "long": make_texts("long", args.long, 1)}
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows: list[dict[str, Any]] = []
    overhead = {}
    for precision in precisions:
        inproc = in_process(args.bundle, precision, sets, args.threads)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        ours = [sys.executable, "-m", "qwen3emb.cli", "serve", str(args.bundle), "--port",
                str(port), "--precision", precision, "--model-name", "bench",
                *(["--threads", str(args.threads)] if args.threads else [])]
        served = run_server(f"qwen3emb serve ({precision})", ours, base + "/ready", port,
                            "bench", sets, args.output / f"serve-{precision}.log")
        rows += inproc + served
        from qwen3emb.serve.settings import CPU_BATCH

        policy = CPU_BATCH[1] if precision in ("fp32", "fp16") else 1
        for kind in sets:
            alone = next(r for r in inproc
                         if r["server"].endswith(f"(batch {policy})") and r["texts"] == kind)
            busy = next(r for r in served if r["texts"] == kind and r["concurrency"] == 64)
            overhead[f"{precision}, {kind} texts"] = {
                "throughput": 1 - busy["requests_per_s"] / alone["requests_per_s"],
                "cpu": 1 - alone["cpu_ms_per_request"] / busy["cpu_ms_per_request"]}
    notes = []
    if args.gguf_type and importlib.util.find_spec("llama_cpp.server") is not None:
        from qwen3emb.manifest import read_manifest

        gguf = args.bundle / read_manifest(args.bundle).models("gguf")[args.gguf_type]["path"]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        # n_ctx = n_batch = n_ubatch = 4096 so that a long text is neither cut nor split.
        llama = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                 "127.0.0.1", "--port", str(port), "--embedding", "true", "--n_ctx", "4096",
                 "--n_batch", "4096", "--n_ubatch", "4096", "--verbose", "false",
                 *(["--n_threads", str(args.threads)] if args.threads else [])]
        rows += run_server(f"llama-cpp-python server ({args.gguf_type})", llama,
                           base + "/v1/models", port, None, sets, args.output / "llama.log")
    elif args.gguf_type:
        notes.append("llama-cpp-python's server is not installed: pip install "
                     "'llama-cpp-python[server]'")
    from qwen3emb.runtime import TextEmbedder

    tokenizer = TextEmbedder(args.bundle)
    tokens = {k: round(sum(map(len, tokenizer.tokenize(v))) / len(v), 1) for k, v in sets.items()}
    result = {"meta": {"bundle": str(args.bundle), "bundle_name": args.bundle.name,
                       "precisions": precisions, "gguf_type": args.gguf_type,
                       "machine": f"{platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} CPUs",
                       "counts": {k: len(v) for k, v in sets.items()}, "tokens": tokens,
                       "load_before": load_before,
                       "load_after": [round(x, 2) for x in os.getloadavg()]},
              "rows": rows, "overhead": overhead, "notes": notes}
    (args.output / "load_test.json").write_text(json.dumps(result, indent=2))
    (args.output / "load_test.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
