"""Typer commands: export, validate, embed, inspect, demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from qwen3emb.cli._common import (
    Precision,
    Provider,
    Quiet,
    Verbose,
    configure_logging,
    quiet_libraries,
    fail,
    handle_errors,
)
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
        verdict = "pass" if a.passed else "FAIL"
        typer.echo(f"  {a.artifact:<28} {a.precision:<5} min cosine {a.min_cosine:.6f} "
                   f"(floor {a.floor})  {verdict}")
        for failure in a.failures:
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
        help="int8 scheme: dynamic, smoothquant, nbits8 (default: smoothquant).")] = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Export a Qwen3-Embedding checkpoint to a bundle (ONNX + tokenizer + manifest + report).

    Exit code 0 when the bundle is written (and passes validation), 1 when an artifact
    misses its fidelity floor, 2 on bad input.

    Examples:

        qwen3emb-export export Qwen/Qwen3-Embedding-0.6B -o qwen3-0.6b

        qwen3emb-export export ./my-checkpoint -o out --dimensions 256 --no-validate

        qwen3emb-export export ./my-checkpoint -o out --precision int8 --precision int4
    """
    configure_logging(verbose, quiet)
    from qwen3emb.export import export_bundle

    quiet_libraries()

    result = export_bundle(model, output, dimensions=dimensions, max_length=max_length,
                           opset=opset, validate=validate, force=force, revision=revision,
                           precisions=precision, int8_scheme=int8_scheme)
    if not quiet:
        typer.echo(f"bundle: {result.bundle}")
        for a in result.manifest["artifacts"]:
            typer.echo(f"  {a['path']:<28} {_size(a['size']):>9}  sha256 {a['sha256'][:12]}")
    if result.report is not None:
        if not quiet:
            typer.echo("parity:")
            _print_report_summary(result.report, str(result.bundle / "reports" / "parity.md"))
        if not result.report.passed:
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
    report = validate_bundle(bundle, reference, texts=extra, precisions=precision,
                             providers=provider)
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
    dimensions: Annotated[int | None, typer.Option(help="Matryoshka width.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write FILE.npy or FILE.jsonl instead of JSON lines on stdout.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per onnxruntime call.")] = 32,
    precision: Precision = "fp32",
    provider: Provider = None,
    verbose: Verbose = False,
) -> None:
    """Embed texts with a bundle (no torch needed).

    Examples:

        qwen3emb-export embed qwen3-0.6b "The capital of France is Paris."

        qwen3emb-export embed qwen3-0.6b "capital of France?" --query -o q.npy
    """
    configure_logging(verbose)
    if not texts:
        raise fail("no texts given. Pass one or more TEXT arguments", EXIT_USAGE)
    if task is not None and not query:
        raise fail("--task only applies to queries. Add --query", EXIT_USAGE)
    _embed(bundle, texts, query, task, dimensions, output, batch_size, precision, provider)


@handle_errors
def _embed(bundle: Path, texts: list[str], query: bool, task: str | None, dimensions: int | None,
           output: Path | None, batch_size: int, precision: str, provider: list[str] | None
           ) -> None:
    from qwen3emb.runtime import TextEmbedder

    if output is not None and output.suffix not in (".npy", ".jsonl"):
        raise InputError(f"--output '{output}' must end in .npy or .jsonl",
                         hint="Choose FILE.npy for numpy or FILE.jsonl for JSON lines")
    embedder = TextEmbedder(bundle, provider, precision=precision)
    vectors = (embedder.encode_queries(texts, task, dimensions=dimensions, batch_size=batch_size)
               if query else embedder.encode(texts, dimensions=dimensions, batch_size=batch_size))
    lines = (json.dumps({"index": i, "text": t, "embedding": [round(float(x), 7) for x in v]},
                        ensure_ascii=False) for i, (t, v) in enumerate(zip(texts, vectors)))
    if output is None:
        for line in lines:
            typer.echo(line)
        return
    tmp = output.with_name(output.name + ".partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix == ".npy":
            import numpy as np

            with open(tmp, "wb") as handle:
                np.save(handle, vectors)
        else:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write '{output}': {e.strerror or e}",
                          hint="Choose a writable path") from e
    typer.echo(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {output}", err=True)


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
        typer.echo(f"tokens:  max {tok['max_length']}, end token {tok['end_token']} "
                   f"(id {tok['end_token_id']}) appended by the tokenizer")
        typer.echo(f"queries: {data['prompt']['query_template']!r}")
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

    for command in (export, validate, embed, inspect, demo):
        app.command()(handle_errors(command) if command is not embed else command)
    return app


if __name__ == "__main__":  # pragma: no cover
    create_app()(prog_name=os.path.basename(sys.argv[0]))
