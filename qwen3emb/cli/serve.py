"""The ``serve`` command: an OpenAI-compatible embeddings server for a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwen3emb.cli._common import Provider, Verbose, configure_logging


def serve(
    bundles: Annotated[list[Path], typer.Argument(
        help="Bundle directories (text or Qwen3-VL embedders, rerankers), served side by side.",
        metavar="BUNDLE...")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    precision: Annotated[str | None, typer.Option(
        help="ONNX precision or GGUF type (runs on llama.cpp) to serve; default fp32, or the "
        "best GGUF of a GGUF-only bundle.")] = None,
    provider: Provider = None,
    model_name: Annotated[list[str] | None, typer.Option(
        help="Name clients send as 'model', once per bundle in order (default: the bundle "
        "directory's name).")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        help="File of accepted API keys, one per line (default: no authentication).")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(
        help="Padded tokens per inference call (default: 2048 on CPU, 16384 on GPU).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(
        help="Sequences per inference call (default: 8 on CPU, 32 on GPU).")] = None,
    max_inputs: Annotated[int, typer.Option(help="Inputs per request.")] = 2048,
    max_tokens: Annotated[int | None, typer.Option(
        help="Tokens per input (default: the bundle's max_length); longer ones are cut, "
        "keeping the end token, or refused with truncate: false.")] = None,
    max_queue: Annotated[int, typer.Option(
        help="Requests waiting or running at once; more get 429.")] = 256,
    max_queue_tokens: Annotated[int, typer.Option(
        help="Tokens waiting or running at once; a request with more gets 413.")] = 2**18,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 32 * 2**20,
    batch_wait_ms: Annotated[float, typer.Option(
        help="How long an idle server waits for more requests before a batch runs (while "
        "a batch runs, the next one fills up anyway).")] = 0.0,
    threads: Annotated[int | None, typer.Option(help="Inference threads.")] = None,
    task: Annotated[str | None, typer.Option(
        help="Default task of queries sent without an instruction (default: the model "
        "card's web-search task).")] = None,
    allow_files: Annotated[Path | None, typer.Option(
        help="Let Qwen3-VL items name image/video files under this directory.")] = None,
    single_sequence: Annotated[bool | None, typer.Option(
        "--single-sequence/--batch-sequences",
        help="Run one sequence per inference call, or batch them (default: one per call for "
        "int8/int4 ONNX, whose activation scales span the batch).")] = None,
    drain_timeout: Annotated[int, typer.Option(
        help="Seconds to let in-flight requests finish on SIGTERM.")] = 30,
    verbose: Verbose = False,
) -> None:
    """Serve bundles over an OpenAI-compatible HTTP API: POST /v1/embeddings for embedders,
    POST /v1/rerank, /v2/rerank (Cohere, Jina) and /rerank (TEI) for rerankers.

    Needs the serve extra: pip install 'qwen3emb-export[serve]'. Loopback only and no CORS by
    default; with --api-key-file, requests need 'Authorization: Bearer KEY'. SIGTERM drains
    in-flight requests and exits 0.

    Examples:

        qwen3emb-export serve qwen3-0.6b --port 8000

        qwen3emb-export serve qwen3-0.6b --precision int8 --api-key-file keys.txt --host 0.0.0.0

        qwen3emb-export serve qwen3-vl-2b --allow-files /data/images

        qwen3emb-export serve qwen3-0.6b qwen3-reranker-0.6b --model-name embed --model-name rerank
    """
    configure_logging(verbose)
    from qwen3emb.errors import InputError, require

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve")
    from qwen3emb.serve.backend import load_backend
    from qwen3emb.serve.server import run_server
    from qwen3emb.serve.settings import ServeSettings, read_api_keys

    names = list(model_name or [])
    if len(names) > len(bundles):
        raise InputError(f"{len(names)} --model-name for {len(bundles)} bundles",
                         hint="Give at most one --model-name per bundle, in the bundles' order")
    common = dict(
        precision=precision, providers=tuple(provider or ()),
        api_keys=read_api_keys(api_key_file) if api_key_file else (),
        max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms, max_inputs=max_inputs, max_tokens=max_tokens,
        max_queue=max_queue, max_queue_tokens=max_queue_tokens, max_body_bytes=max_body_bytes,
        threads=threads, default_task=task, allow_files=allow_files,
        single_sequence=single_sequence)
    settings = [ServeSettings(bundle=b, model_name=names[i] if i < len(names) else None,
                              **common)  # type: ignore[arg-type]
                for i, b in enumerate(bundles)]
    served = [s.served_name for s in settings]
    if len(set(served)) < len(served):
        raise InputError(f"two bundles would be served under one name ({', '.join(served)})",
                         hint="Give each bundle its own --model-name")
    backends = [load_backend(s) for s in settings]
    for s, backend in zip(settings, backends):
        typer.echo(f"serving '{s.served_name}' ({backend.kind}, {backend.runtime} "
                   f"{backend.precision}) on http://{host}:{port}", err=True)
    run_server(settings, backends, host=host, port=port, drain_timeout=drain_timeout,
               access_log=verbose)
