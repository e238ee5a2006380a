"""Typer commands: export, validate, embed, inspect, demo, serve."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from qwen3emb.cli._common import (
    Precision,
    ProgressOpt,
    Provider,
    Quiet,
    Verbose,
    configure_logging,
    fail,
    handle_errors,
    quiet_libraries,
)
from qwen3emb.cli.serve import serve
from qwen3emb.constants import DEFAULT_OPSET, EXIT_PARITY_FAILED, EXIT_USAGE
from qwen3emb.errors import InputError, OutputError


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _print_report_summary(report: object, where: str | None = None) -> None:
    for a in report.artifacts:  # type: ignore[attr-defined]
        verdict = "pass" if a.passed else "measured, not gated" if a.informational else "FAIL"
        typer.echo(f"  {a.artifact:<28} {a.precision:<5} min cosine {a.min_cosine:.6f} "
                   f"(floor {a.floor})  {verdict}")
        for failure in [] if a.informational else a.failures:
            typer.echo(f"      {failure}")
    if where:
        typer.echo(f"  report: {where}")


def export(
    model: Annotated[str, typer.Argument(help="Local checkpoint directory or hub id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle directory to create.")],
    dimensions: Annotated[int | None, typer.Option(
        help="Bake a Matryoshka width into the graph (default: full width).")] = None,
    max_length: Annotated[int | None, typer.Option(
        help="Longest input in tokens (default: min(8192, max_position_embeddings)).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = DEFAULT_OPSET,
    validate: Annotated[bool, typer.Option(
        help="Check parity against the HuggingFace reference and put the report in the bundle."
    )] = True,
    force: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
    revision: Annotated[str | None, typer.Option(help="Hub revision.")] = None,
    precision: Annotated[list[str] | None, typer.Option(
        "--precision", help="ONNX precision to write: fp32, fp16, int8, int4 (repeatable; "
        "fp32 is always written as the reference).")] = None,
    int8_scheme: Annotated[str | None, typer.Option(
        help="int8 scheme: dynamic, smoothquant, nbits8, mixed (default: smoothquant; mixed "
        "for Qwen3-VL decoders).")] = None,
    format: Annotated[list[str] | None, typer.Option(
        "--format", help="onnx and/or gguf (repeatable; default onnx).")] = None,
    gguf_type: Annotated[list[str] | None, typer.Option(
        "--gguf-type", help="GGUF type: f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k "
        "(repeatable; default f16; implies --format gguf).")] = None,
    progress: ProgressOpt = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Export a Qwen3-Embedding checkpoint to a bundle (ONNX and/or GGUF + tokenizer + manifest +
    parity report).

    Exit code 0 when the bundle is written (and passes validation), 1 when an artifact
    misses its fidelity floor, 2 on bad input.

    Examples:

        qwen3emb-export export Qwen/Qwen3-Embedding-0.6B -o qwen3-0.6b

        qwen3emb-export export ./my-checkpoint -o out --dimensions 256 --no-validate

        qwen3emb-export export ./my-checkpoint -o out --format onnx --format gguf \\
            --gguf-type f16 --gguf-type q8_0

        qwen3emb-export export ./my-checkpoint -o out --precision int8 --precision int4
    """
    configure_logging(verbose, quiet)
    from qwen3emb.export import export_bundle

    quiet_libraries()

    from qwen3emb.progress import peak_rss_bytes, progress_default

    start = time.perf_counter()
    show = (progress if progress is not None else progress_default()) and not quiet
    result = export_bundle(model, output, dimensions=dimensions, max_length=max_length,
                           opset=opset, validate=validate, force=force, revision=revision,
                           formats=format or ["onnx"], gguf_types=gguf_type or [],
                           progress=show, precisions=precision, int8_scheme=int8_scheme)
    if not quiet:
        typer.echo(f"bundle: {result.bundle}")
        for a in result.manifest["artifacts"]:
            typer.echo(f"  {a['path']:<28} {_size(a['size']):>9}  sha256 {a['sha256'][:12]}")
    if result.report is not None:
        if not quiet:
            typer.echo("parity:")
            _print_report_summary(result.report, str(result.bundle / "reports" / "parity.md"))
    if not quiet:
        typer.echo(f"done in {time.perf_counter() - start:.1f} s, peak memory "
                   f"{peak_rss_bytes() / 1e9:.2f} GB")
    if result.report is not None and not result.report.passed:
        raise fail("an artifact is below its fidelity floor (see the report)",
                   EXIT_PARITY_FAILED)


def validate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    reference: Annotated[str, typer.Option(
        "--reference", "-r", help="Checkpoint the bundle came from (directory or hub id).")],
    texts: Annotated[Path | None, typer.Option(
        help="Extra probe texts, one per line, added to the built-in probe set.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown report.")] = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report.")] = None,
    precision: Annotated[list[str] | None, typer.Option(
        help="Only these precisions (repeatable; default: all).")] = None,
    provider: Provider = None,
    reference_dtype: Annotated[str, typer.Option(
        help="Reference precision: auto (fp32 when it fits in half the free memory, else "
        "bf16), float32 or bfloat16.")] = "auto",
    progress: ProgressOpt = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Compare every artifact in a bundle with the HuggingFace reference.

    Exit code 0 when every artifact meets its floor, 1 when one does not, 2 on bad input.

    Example:

        qwen3emb-export validate qwen3-0.6b -r Qwen/Qwen3-Embedding-0.6B --junit parity.xml
    """
    configure_logging(verbose, quiet)
    from qwen3emb.validate import validate_bundle
    from qwen3emb.validate.probes import read_texts_file
    from qwen3emb.validate.report import write_report

    quiet_libraries()

    extra = read_texts_file(texts) if texts else None
    from qwen3emb.progress import progress_default

    if reference_dtype not in ("auto", "float32", "bfloat16"):
        raise fail(f"--reference-dtype {reference_dtype!r} is not one of auto, float32, "
                   "bfloat16", EXIT_USAGE)
    show = (progress if progress is not None else progress_default()) and not quiet
    report = validate_bundle(bundle, reference, texts=extra, precisions=precision,
                             providers=provider, reference_dtype=reference_dtype, progress=show)
    write_report(report, json_path=json_path, markdown_path=markdown, junit_path=junit)
    if not quiet:
        typer.echo(f"parity {'PASS' if report.passed else 'FAIL'} for {bundle} "
                   f"(reference {report.reference['precision']}, {report.seconds:.1f} s)")
        _print_report_summary(report)
    if not report.passed:
        raise typer.Exit(EXIT_PARITY_FAILED)


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
    onnx_models, gguf_models = manifest.models("onnx"), manifest.models("gguf")
    if precision in gguf_models and precision not in onnx_models:
        if provider:
            raise InputError("--provider applies to ONNX models, not GGUF",
                             hint="Drop --provider, or choose an ONNX --precision")
        return GGUFTextEmbedder(bundle, gguf_type=precision)
    if precision == "fp32" and not onnx_models and gguf_models:
        return GGUFTextEmbedder(bundle)
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


def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file's sha256.")] = True,
) -> None:
    """Show what a bundle holds and check its files against the manifest.

    Exit code 1 when a file is missing or its hash does not match.

    Example:

        qwen3emb-export inspect qwen3-0.6b --json
    """
    configure_logging()
    from qwen3emb.manifest import read_manifest

    manifest = read_manifest(bundle)
    problems = manifest.verify() if verify else []
    data = manifest.data
    if as_json:
        typer.echo(json.dumps({"bundle": str(bundle), "intact": not problems,
                               "problems": problems, "manifest": data}, indent=2,
                              ensure_ascii=False))
    else:
        emb, tok = data["embedding"], data["tokenizer"]
        typer.echo(f"bundle:  {bundle}")
        typer.echo(f"family:  {data['family']} ({', '.join(data.get('architectures', []))})")
        typer.echo(f"source:  {data['source']['model']}")
        typer.echo(f"dims:    {emb['output_dim']} (Matryoshka {emb['mrl_min']}..{emb['mrl_max']}),"
                   f" {emb['pooling']} pooling, {emb['normalization']} normalized")
        if "end_token" in tok:
            typer.echo(f"tokens:  max {tok['max_length']}, end token {tok['end_token']} "
                       f"(id {tok['end_token_id']}) appended by the tokenizer")
        else:
            typer.echo(f"tokens:  max {tok['max_length']}, pooled token "
                       f"{emb.get('pooled_token', 'last')}")
        prompt = data["prompt"]
        if "query_template" in prompt:
            typer.echo(f"queries: {prompt['query_template']!r}")
        else:
            typer.echo(f"prompt:  system {prompt.get('default_instruction')!r}, content order "
                       f"{', '.join(prompt.get('content_order', []))}")
        typer.echo("files:")
        bad = {p.split(':')[0] for p in problems}
        for a in data["artifacts"]:
            state = "MISMATCH" if a["path"] in bad else ("ok" if verify else "unchecked")
            label = a.get("precision", a.get("role", ""))
            typer.echo(f"  {a['path']:<28} {label:<9} {_size(a['size']):>9}  {state}")
        parity = data.get("parity", {})
        typer.echo(f"parity:  {parity.get('status', 'not-run')}"
                   + (f" {parity.get('min_cosine')}" if parity.get("min_cosine") else ""))
        for problem in problems:
            typer.echo(f"problem: {problem}", err=True)
    if problems:
        raise typer.Exit(EXIT_PARITY_FAILED)


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Working directory.")] = Path(
        "qwen3emb-demo"),
    verbose: Verbose = False,
) -> None:
    """Build a small random-weight Qwen3 checkpoint, export it, validate it, embed with it.

    Everything runs offline in about a minute. The directory gets checkpoint/ and bundle/;
    running it again replaces them.

    Example:

        qwen3emb-export demo -o /tmp/qwen3emb-demo
    """
    configure_logging(verbose)
    import qwen3emb.export  # noqa: F401  (imports torch, so its loggers can be quieted)
    from qwen3emb.demo import run_demo

    quiet_libraries()

    summary = run_demo(output)
    for line in summary.lines:
        typer.echo(line)
    if not summary.passed:
        raise typer.Exit(EXIT_PARITY_FAILED)


def _version_callback(value: bool) -> None:
    if value:
        from qwen3emb import __version__

        typer.echo(f"qwen3emb-export {__version__}")
        raise typer.Exit()


def create_app() -> typer.Typer:
    """Build the Typer application."""
    app = typer.Typer(
        name="qwen3emb-export",
        help="Export Qwen3-Embedding checkpoints to ONNX bundles with pooling in the graph, "
        "check them against HuggingFace, and embed with them.\n\n"
        "Start with: qwen3emb-export demo",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def _root(version: Annotated[bool, typer.Option(
            "--version", callback=_version_callback, is_eager=True,
            help="Print the version.")] = False) -> None:
        """qwen3emb-export"""

    for command in (export, validate, embed, inspect, demo, serve):
        app.command()(handle_errors(command) if command is not embed else command)
    return app


if __name__ == "__main__":  # pragma: no cover
    create_app()(prog_name=os.path.basename(sys.argv[0]))
