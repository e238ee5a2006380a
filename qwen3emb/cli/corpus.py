"""``qwen3emb-export embed-corpus``: wiring for :func:`qwen3emb.corpus.embed_corpus`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from qwen3emb.cli._common import ProgressOpt, Quiet, Verbose, configure_logging
from qwen3emb.errors import require


def embed_corpus(
    bundle: Annotated[Path, typer.Argument(
        metavar="BUNDLE", help="Bundle directory (on shared storage when running on a cluster).")],
    inputs: Annotated[list[str], typer.Argument(
        metavar="INPUT...", help="Parquet, JSONL, CSV or text files (one document per line), "
        "directories or globs; any filesystem fsspec opens (s3://, gs://, ...).")],
    output: Annotated[str, typer.Option(
        "--output", "-o", help="Output directory (path or URL); must not exist unless --resume.")],
    id_column: Annotated[str | None, typer.Option(
        help="Id column (default: 'id' where a file has one, else FILE:LINE).")] = None,
    text_column: Annotated[str, typer.Option(help="Text column.")] = "text",
    image_column: Annotated[str | None, typer.Option(
        help="Image column: paths (relative to the input file) or bytes. Qwen3-VL bundles.")
    ] = None,
    query: Annotated[bool, typer.Option(
        "--query", help="Text bundles: embed rows as queries (with the instruction).")] = False,
    instruction: Annotated[str | None, typer.Option(
        help="Query task (text bundles, with --query) or system instruction (Qwen3-VL).")
    ] = None,
    dimensions: Annotated[int | None, typer.Option(help="Matryoshka width.")] = None,
    precision: Annotated[str, typer.Option(
        help="Which ONNX model of the bundle: fp32 (default), fp16, int8, int4.")] = "fp32",
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on this machine).")
    ] = None,
    actors: Annotated[int | None, typer.Option(
        help="Embedding actors, each loading the bundle once (default: CPUs / threads).")
    ] = None,
    threads_per_actor: Annotated[int | None, typer.Option(
        help="onnxruntime threads (and Ray CPUs) per actor (default: up to 4).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per onnxruntime call.")] = 32,
    provider: Annotated[str | None, typer.Option(
        "--provider", "-p", help="Where actors run the graph: cpu (onnxruntime, default), "
        "cuda, or openvino.")] = None,
    unit_rows: Annotated[int | None, typer.Option(
        help="Rows per unit of work and commit (default 1024; 64 with --image-column).")
    ] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue OUT: keep committed units, redo partial ones.")] = False,
    float16: Annotated[bool, typer.Option(
        "--float16", help="Store float16 vectors (half the size).")] = False,
    progress: ProgressOpt = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Embed a whole corpus on Ray Data, exactly once, into Parquet parts under OUT.

    Each row gets id, embedding, n_tokens and truncated; rows that cannot be embedded are
    listed in OUT/_errors.jsonl; OUT/_manifest.json records the bundle, options and counts.
    Without --address (and RAY_ADDRESS) a local Ray uses this machine's cores; with one, the
    same command runs on that cluster. After any crash, rerun with --resume: every id ends
    up exactly once.

    Examples:

        qwen3emb-export embed-corpus qwen3-0.6b docs/ -o vectors/

        qwen3emb-export embed-corpus qwen3-0.6b 'data/*.parquet' -o vectors/ --resume

        qwen3emb-export embed-corpus qwen3-vl-2b photos.csv -o vectors/ --image-column path

        RAY_ADDRESS=auto qwen3emb-export embed-corpus /shared/b s3://corpus/ -o s3://out/
    """
    configure_logging(verbose, quiet)
    require("ray", extra="corpus")
    require("pyarrow", extra="corpus")
    require("fsspec", extra="corpus")
    import ray.data  # noqa: F401  (configures its loggers on import; quieted below)

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    from qwen3emb.corpus import CorpusOptions, RayOptions
    from qwen3emb.corpus import embed_corpus as run
    from qwen3emb.progress import progress_default

    options = CorpusOptions(text_column=text_column, id_column=id_column,
                            image_column=image_column, query=query, instruction=instruction,
                            dimensions=dimensions, precision=precision, float16=float16,
                            batch_size=batch_size, unit_rows=unit_rows, provider=provider)
    ray_options = RayOptions(address=address, actors=actors, threads_per_actor=threads_per_actor,
                             verbose=verbose)
    show = (progress_default() if progress is None else progress) and not quiet
    summary = run(bundle, inputs, output, options=options, ray_options=ray_options,
                  resume=resume, progress=show)
    if quiet:
        return
    typer.echo(f"embedded {summary.rows_now:,} rows ({summary.tokens_now:,} tokens) in "
               f"{summary.seconds:.1f} s: {summary.rows_per_second:,.1f} rows/s, "
               f"{summary.tokens_per_second:,.0f} tokens/s on {summary.where}"
               + (f" ({_count(summary.actors, 'actor')} x "
                  f"{_count(summary.threads_per_actor, 'thread')})" if summary.actors else ""))
    if summary.errors:
        reasons = ", ".join(f"{code} {n}" for code, n in sorted(summary.errors_by_code.items()))
        typer.echo(f"skipped {summary.errors:,} rows ({reasons}): see {summary.out}/_errors.jsonl")
    before = summary.units - summary.units_now
    typer.echo(f"units:   {summary.units_now} of {summary.units} this run"
               + (f" ({before} committed before)" if before else "")
               + f"; OUT holds {summary.rows:,} rows: {summary.out}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
