"""The Typer app and its commands export, validate, inspect and demo (embed, serve,
embed-corpus, push: their own modules)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from qwen3emb.cli._common import (
    LongProbeOpt,
    ProgressOpt,
    Provider,
    Quiet,
    Verbose,
    configure_logging,
    fail,
    handle_errors,
    long_probes,
    quiet_libraries,
)
from qwen3emb.cli.corpus import embed_corpus
from qwen3emb.cli.embed import embed
from qwen3emb.cli.eval_options import (
    EvalCandidatesOpt,
    EvalDepthOpt,
    EvalMaxDropOpt,
    EvalMaxLengthOpt,
    EvalSetOpt,
    EvalSplitOpt,
    EvalTaskOpt,
    eval_request,
    print_retrieval_summary,
)
from qwen3emb.cli.serve import serve
from qwen3emb.constants import DEFAULT_OPSET, EXIT_PARITY_FAILED, EXIT_USAGE


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _print_report_summary(report: object, where: str | None = None) -> None:
    for a in report.artifacts:  # type: ignore[attr-defined]
        verdict = "pass" if a.passed else "measured, not gated" if a.informational else "FAIL"
        figure = (f"max |score diff| {a.max_abs_score_diff:.2e}" if hasattr(a, "score_diffs")
                  else f"min cosine {a.min_cosine:.6f}")
        typer.echo(f"  {a.name:<28} {a.precision:<5} {figure} (floor {a.floor})  {verdict}")
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
        help="Longest input in tokens (default: the checkpoint's max_position_embeddings; "
             "8192 for Qwen3-VL, as its reference).")] = None,
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
        help="Force a fixed int8/int4 recipe: dynamic, smoothquant, nbits8, mixed (default: "
        "an accuracy-driven search that escalates sensitive MatMuls until the floors hold; "
        "mixed for Qwen3-VL decoders).")] = None,
    target: Annotated[list[str] | None, typer.Option(
        "--target", help="Calibration min cosine the int8/int4 search aims for, as "
        "PRECISION=COSINE (repeatable; default int8=0.998, int4=0.96): higher is more "
        "faithful and slower, e.g. int8=0.9994.")] = None,
    format: Annotated[list[str] | None, typer.Option(
        "--format", help="onnx and/or gguf (repeatable; default onnx).")] = None,
    gguf_type: Annotated[list[str] | None, typer.Option(
        "--gguf-type", help="GGUF type: f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k "
        "(repeatable; default f16; implies --format gguf).")] = None,
    task: Annotated[str | None, typer.Option(
        help="embed or rerank (default: rerank when the model's name contains 'reranker', "
             "else embed; config and weights cannot tell them apart).")] = None,
    long_probe: LongProbeOpt = None,
    progress: ProgressOpt = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Export a Qwen3-Embedding (or Qwen3-Reranker) checkpoint to a bundle (ONNX and/or GGUF +
    tokenizer + manifest + parity report).

    Exit code 0 when the bundle is written (and passes validation), 1 when an artifact
    misses its fidelity floor, 2 on bad input.

    Examples:

        qwen3emb-export export Qwen/Qwen3-Embedding-0.6B -o qwen3-0.6b

        qwen3emb-export export ./my-checkpoint -o out --dimensions 256 --no-validate

        qwen3emb-export export ./my-checkpoint -o out --format onnx --format gguf \\
            --gguf-type f16 --gguf-type q8_0

        qwen3emb-export export ./my-checkpoint -o out --precision int8 --precision int4

        qwen3emb-export export Qwen/Qwen3-Reranker-0.6B -o reranker --precision fp16
    """
    configure_logging(verbose, quiet)
    from qwen3emb.pipeline import export_bundle

    quiet_libraries()

    from qwen3emb.progress import peak_rss_bytes, progress_default

    start = time.perf_counter()
    show = (progress if progress is not None else progress_default()) and not quiet
    result = export_bundle(model, output, dimensions=dimensions, max_length=max_length,
                           opset=opset, validate=validate, force=force, revision=revision,
                           formats=format or ["onnx"], gguf_types=gguf_type or [],
                           progress=show, precisions=precision, int8_scheme=int8_scheme,
                           targets=target, long_probes=long_probes(long_probe), task=task)
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
        help="Reference: auto (fp32 when it fits in half the free memory, else fp32 layer by "
        "layer), float32, layerwise or bfloat16.")] = "auto",
    eval_set: EvalSetOpt = None,
    eval_split: EvalSplitOpt = "test",
    eval_task: EvalTaskOpt = None,
    eval_max_length: EvalMaxLengthOpt = None,
    eval_max_drop: EvalMaxDropOpt = None,
    candidates: EvalCandidatesOpt = None,
    candidates_depth: EvalDepthOpt = 100,
    long_probe: LongProbeOpt = None,
    progress: ProgressOpt = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Compare every artifact in a bundle with the HuggingFace reference.

    Exit code 0 when every artifact meets its floor, 1 when one does not, 2 on bad input.

    Example:

        qwen3emb-export validate qwen3-0.6b -r Qwen/Qwen3-Embedding-0.6B --junit parity.xml

        qwen3emb-export validate qwen3-0.6b -r Qwen/Qwen3-Embedding-0.6B --eval-set ./scifact

        qwen3emb-export validate reranker -r Qwen/Qwen3-Reranker-0.6B --eval-set ./scifact
        --candidates bm25.run
    """
    configure_logging(verbose, quiet)
    from qwen3emb.validate import validate_bundle
    from qwen3emb.validate.probes import read_texts_file
    from qwen3emb.validate.report import write_report

    quiet_libraries()

    extra = read_texts_file(texts) if texts else None
    from qwen3emb.progress import progress_default

    if reference_dtype not in ("auto", "float32", "layerwise", "bfloat16"):
        raise fail(f"--reference-dtype {reference_dtype!r} is not one of auto, float32, "
                   "layerwise, bfloat16", EXIT_USAGE)
    show = (progress if progress is not None else progress_default()) and not quiet
    request = eval_request(eval_set, eval_split, eval_task, eval_max_length, eval_max_drop,
                           candidates, candidates_depth)
    report = validate_bundle(bundle, reference, texts=extra, precisions=precision,
                             providers=provider, reference_dtype=reference_dtype, progress=show,
                             eval_set=request, long_probes=long_probes(long_probe))
    write_report(report, json_path=json_path, markdown_path=markdown, junit_path=junit)
    if not quiet:
        typer.echo(f"parity {'PASS' if report.passed else 'FAIL'} for {bundle} "
                   f"(reference {report.reference['precision']}, {report.seconds:.1f} s)")
        _print_report_summary(report)
        print_retrieval_summary(report)
    if not report.passed:
        raise typer.Exit(EXIT_PARITY_FAILED)


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
    elif data.get("task") == "rerank":
        tok, rerank = data["tokenizer"], data["rerank"]
        typer.echo(f"bundle:  {bundle}")
        typer.echo(f"family:  {data['family']} reranker "
                   f"({', '.join(data.get('architectures', []))})")
        typer.echo(f"source:  {data['source']['model']}")
        typer.echo(f"score:   {rerank['score']} (yes id {rerank['yes_token_id']}, no id "
                   f"{rerank['no_token_id']}); pairs up to {tok['max_length']} tokens")
        if "template" in rerank:
            typer.echo(f"content: {rerank['template']!r}")
        else:  # Qwen3-VL: the released reranker's user turn
            typer.echo(f"content: {rerank['instruction_prefix'] + '{instruction}'!r} "
                       f"{rerank['query_prefix'] + '{query}'!r} "
                       f"{rerank['document_prefix'] + '{document}'!r} (videos, images, text "
                       f"per side; pairs' last {rerank['tail_tokens']} tokens never cut)")
        _print_files(data, problems, verify)
        parity = data.get("parity", {})
        typer.echo(f"parity:  {parity.get('status', 'not-run')}"
                   + (f" {parity.get('max_abs_score_diff')}"
                      if parity.get("max_abs_score_diff") else ""))
        for problem in problems:
            typer.echo(f"problem: {problem}", err=True)
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
        _print_files(data, problems, verify)
        parity = data.get("parity", {})
        typer.echo(f"parity:  {parity.get('status', 'not-run')}"
                   + (f" {parity.get('min_cosine')}" if parity.get("min_cosine") else ""))
        for problem in problems:
            typer.echo(f"problem: {problem}", err=True)
    if problems:
        raise typer.Exit(EXIT_PARITY_FAILED)


def _print_files(data: dict, problems: list[str], verify: bool) -> None:
    typer.echo("files:")
    bad = {p.split(':')[0] for p in problems}
    for a in data["artifacts"]:
        state = "MISMATCH" if a["path"] in bad else ("ok" if verify else "unchecked")
        label = a.get("precision", a.get("role", ""))
        typer.echo(f"  {a['path']:<28} {label:<9} {_size(a['size']):>9}  {state}")


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
    import qwen3emb.pipeline  # noqa: F401  (imports torch, so its loggers can be quieted)
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

    from qwen3emb.cli.push import push
    from qwen3emb.cli.rerank import rerank

    for command in (export, validate, embed, rerank, inspect, demo, serve, embed_corpus, push):
        app.command()(handle_errors(command) if command is not embed else command)
    return app


if __name__ == "__main__":  # pragma: no cover
    create_app()(prog_name=os.path.basename(sys.argv[0]))
