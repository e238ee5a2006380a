"""``qwen3emb-export embed``: texts, images and videos through a bundle, no torch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from qwen3emb.cli._common import (
    Precision,
    Provider,
    Verbose,
    configure_logging,
    fail,
    handle_errors,
)
from qwen3emb.constants import EXIT_USAGE
from qwen3emb.errors import InputError, OutputError


def embed(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to embed.")] = None,
    query: Annotated[bool, typer.Option(
        "--query", help="Treat texts as queries: prepend the instruction.")] = False,
    task: Annotated[str | None, typer.Option(help="Query task (default: web search).")] = None,
    text: Annotated[str | None, typer.Option(
        "--text", help="Text of one item (with --image/--video: one mixed item).")] = None,
    image: Annotated[Path | None, typer.Option(
        help="Image file of that item (Qwen3-VL bundles).")] = None,
    video: Annotated[Path | None, typer.Option(
        help="Video file of that item (Qwen3-VL bundles; needs PyAV).")] = None,
    instruction: Annotated[str | None, typer.Option(
        help="System instruction (Qwen3-VL bundles; default: Represent the user's input.)")
    ] = None,
    dimensions: Annotated[int | None, typer.Option(help="Matryoshka width.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write FILE.npy or FILE.jsonl instead of JSON lines on stdout.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per onnxruntime call.")] = 32,
    precision: Precision = "fp32",
    provider: Provider = None,
    verbose: Verbose = False,
) -> None:
    """Embed texts (and, with a Qwen3-VL bundle, images and videos) with a bundle. No torch.

    Each TEXT argument is one item. --text, --image and --video together form one more item
    (a mixed input, embedded as the reference embeds one dict with those keys).

    Examples:

        qwen3emb-export embed qwen3-0.6b "The capital of France is Paris."

        qwen3emb-export embed qwen3-0.6b "capital of France?" --query -o q.npy

        qwen3emb-export embed qwen3-vl-2b --image cat.jpg --text "a cat" --instruction "Find it"

        qwen3emb-export embed qwen3-vl-2b --image cat.jpg --precision int8
    """
    configure_logging(verbose)
    if text is not None:
        texts = [*(texts or []), text] if image is None and video is None else texts
    if not texts and image is None and video is None:
        raise fail("no texts given. Pass one or more TEXT arguments (or --text, --image, "
                   "--video)", EXIT_USAGE)
    if task is not None and not query:
        raise fail("--task only applies to queries. Add --query", EXIT_USAGE)
    mixed = ({k: v for k, v in (("text", text), ("image", image), ("video", video))
              if v is not None} if image is not None or video is not None else None)
    _embed(bundle, texts or [], query, task, dimensions, output, batch_size, precision, provider,
           mixed, instruction)


@handle_errors
def _embed(bundle: Path, texts: list[str], query: bool, task: str | None, dimensions: int | None,
           output: Path | None, batch_size: int, precision: str, provider: list[str] | None,
           mixed: dict[str, Any] | None = None, instruction: str | None = None) -> None:
    from qwen3emb.manifest import read_manifest

    if output is not None and output.suffix not in (".npy", ".jsonl"):
        raise InputError(f"--output '{output}' must end in .npy or .jsonl",
                         hint="Choose FILE.npy for numpy or FILE.jsonl for JSON lines")
    failures: dict[int, str] = {}
    if "vision" in read_manifest(bundle).data:
        if query or task is not None:
            raise InputError("--query/--task are for text bundles",
                             hint="With a Qwen3-VL bundle, pass --instruction instead")
        labels, vectors, failures = _embed_vl(bundle, texts, mixed, instruction, dimensions,
                                              batch_size, provider, precision)
    else:
        if mixed is not None or instruction is not None:
            raise InputError(f"'{bundle}' is a text bundle; --image, --video and --instruction "
                             "need a Qwen3-VL bundle", hint="Pass texts only, or --query")
        embedder = _text_embedder(bundle, precision, provider)
        vectors = (embedder.encode_queries(texts, task, dimensions=dimensions,
                                           batch_size=batch_size)
                   if query else embedder.encode(texts, dimensions=dimensions,
                                                 batch_size=batch_size))
        labels = list(texts)
    _write_vectors(labels, vectors, output, failures)


def _text_embedder(bundle: Path, precision: str, provider: list[str] | None) -> Any:
    """The ONNX embedder, or the llama.cpp one when ``precision`` names a GGUF of the bundle."""
    from qwen3emb.manifest import read_manifest
    from qwen3emb.runtime import GGUFTextEmbedder, TextEmbedder

    manifest = read_manifest(bundle)
    if manifest.runs_on_llama_cpp(precision, provider, default="fp32"):
        # fp32, the option's default, of a GGUF-only bundle: its best GGUF.
        gguf_type = precision if precision in manifest.models("gguf") else None
        return GGUFTextEmbedder(bundle, gguf_type=gguf_type)
    return TextEmbedder(bundle, provider, precision=precision)


def _embed_vl(bundle: Path, texts: list[str], mixed: dict[str, Any] | None,
              instruction: str | None, dimensions: int | None, batch_size: int,
              provider: list[str] | None, precision: str = "fp32"
              ) -> tuple[list[str], object, dict[int, str]]:
    from qwen3emb.runtime import VLEmbedder

    items: list[dict[str, object]] = [{"text": t} for t in texts]
    if mixed is not None:
        items.append({k: str(v) if isinstance(v, Path) else v for k, v in mixed.items()})
    labels = [" + ".join(f"{k}={v}" for k, v in item.items()) for item in items]
    embedder = VLEmbedder(bundle, provider, precision=precision)
    vectors, failures = embedder.encode_with_errors(items, instruction=instruction,
                                                    dimensions=dimensions,
                                                    batch_size=min(batch_size, 8))
    return labels, vectors, failures


def _write_vectors(labels: list[str], vectors: object, output: Path | None,
                   failures: dict[int, str]) -> None:
    """Write the good rows (JSON lines or .npy); then raise for the failed items, if any."""
    import numpy as np

    from qwen3emb.runtime import ItemErrors

    good = [i for i in range(len(labels)) if i not in failures]
    rows = np.asarray(vectors)
    lines = (json.dumps({"index": i, "text": labels[i],
                         "embedding": [round(float(x), 7) for x in rows[i]]}, ensure_ascii=False)
             for i in good)
    if output is None:
        for line in lines:
            typer.echo(line)
    else:
        tmp = output.with_name(output.name + ".partial")
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            if output.suffix == ".npy":
                with open(tmp, "wb") as handle:
                    np.save(handle, rows[good])
            else:
                tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            os.replace(tmp, output)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write '{output}': {e.strerror or e}",
                              hint="Choose a writable path") from e
        typer.echo(f"wrote {len(good)} x {rows.shape[1]} embeddings to {output}", err=True)
    if failures:
        if len(failures) > 1:
            for reason in failures.values():
                typer.echo(f"failed: {reason}", err=True)
        raise ItemErrors(failures, rows)
