"""Write a whole bundle (ONNX, tokenizer, manifest, parity report) atomically."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3emb import __version__
from qwen3emb.constants import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    DEFAULT_GGUF_TYPE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_OPSET,
    DEFAULT_TASK,
    END_TOKEN,
    FORMATS,
    GGUF_DIR,
    MANIFEST_FILE,
    NORMALIZATION,
    ONNX_DIR,
    POOLING,
    QUERY_TEMPLATE,
    REPORTS_DIR,
    TOKENIZER_FILES,
)
from qwen3emb.convert import Family, family_for, load_checkpoint
from qwen3emb.errors import CheckpointError, InputError, OutputError
from qwen3emb.export.spec import TextGraphSpec
from qwen3emb.manifest import file_entry, write_json_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What an export produced."""

    bundle: Path
    manifest: dict[str, Any]
    report: Any = None  # a ParityReport when validated

    @property
    def passed(self) -> bool | None:
        return None if self.report is None else bool(self.report.passed)


@contextmanager
def staged_directory(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; move it into place only if the block succeeds.

    A crash or Ctrl-C removes the temporary directory, so no half-written bundle remains.

    Raises:
        OutputError: ``out`` exists (without ``force``) or its parent is not writable.
    """
    if out.exists() and not force:
        raise OutputError(f"output '{out}' already exists",
                          hint="Delete it, choose another path, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output '{out}' exists and is not a directory",
                          hint="Choose another path")
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write to '{out.parent}': {e.strerror or e}",
                          hint="Choose a writable output directory") from e
    try:
        yield stage
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _check_formats(formats: Sequence[str], gguf_types: Sequence[str]) -> list[str]:
    wanted = [f.lower() for f in formats]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise InputError(f"unknown format {unknown[0]!r}",
                         hint=f"Supported formats: {', '.join(FORMATS)}")
    if gguf_types and "gguf" not in wanted:
        wanted.append("gguf")
    if not wanted:
        raise InputError("no output format chosen", hint="Pass --format onnx and/or --format gguf")
    return wanted


def load_tokenizer_json(checkpoint_dir: Path) -> Any:
    """The checkpoint's ``tokenizer.json`` as a ``tokenizers.Tokenizer``.

    Raises:
        CheckpointError: the file is missing or does not load.
    """
    from tokenizers import Tokenizer

    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"'{checkpoint_dir}' has no tokenizer.json",
                              hint="Use the checkpoint's original tokenizer files")
    try:
        return Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # tokenizers raises bare Exceptions
        raise CheckpointError(f"cannot load '{path}': {e}", hint="Re-download it") from e


def check_tokenizer(checkpoint_dir: Path) -> dict[str, Any]:
    """Verify that ``tokenizer.json`` appends ``<|endoftext|>`` and keeps it on truncation.

    Returns:
        Tokenizer facts for the manifest (end token, its id, the pad id).

    Raises:
        CheckpointError: no tokenizer.json, no end token, or the end token is not appended.
    """
    tokenizer = load_tokenizer_json(checkpoint_dir)
    end_id = tokenizer.token_to_id(END_TOKEN)
    if end_id is None:
        raise CheckpointError(f"tokenizer.json has no {END_TOKEN} token",
                              hint="This is not a Qwen3 tokenizer")
    tokenizer.enable_truncation(max_length=4)
    for text in ("a", "a b c d e f g h i j k l"):
        ids = tokenizer.encode(text).ids
        if not ids or ids[-1] != end_id:
            raise CheckpointError(
                f"tokenizer.json does not end inputs with {END_TOKEN} (for {text!r} the last "
                f"id is {ids[-1] if ids else None}, expected {end_id})",
                hint="Qwen3-Embedding's tokenizer post-processor appends it; use that tokenizer",
            )
    return {"end_token": END_TOKEN, "end_token_id": end_id, "pad_token_id": end_id}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"qwen3emb-export": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers",
                 "numpy", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_manifest(stage: Path, family: Family, *, source: str, weights: list[dict[str, str]],
                   spec: TextGraphSpec, out_dim: int, max_length: int,
                   tokenizer: dict[str, Any], artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """Assemble manifest.json for a text bundle staged in ``stage``."""
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        **family.describe(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model": source, "weights": weights},
        "embedding": {
            "dim": family.embedding_dim,
            "output_dim": out_dim,
            "mrl_min": family.mrl_min,
            "mrl_max": out_dim,
            "pooling": POOLING,
            "normalization": NORMALIZATION,
        },
        "prompt": {
            "query_template": QUERY_TEMPLATE,
            "default_task": DEFAULT_TASK,
            "documents": "no instruction",
        },
        "tokenizer": {
            **tokenizer,
            "max_length": max_length,
            "end_token_rule": (f"the tokenizer's post-processor appends {tokenizer['end_token']}; "
                               "truncate the text, keep the end token last; pool that token"),
            "files": [a["path"] for a in artifacts if a.get("role") == "tokenizer"],
        },
        **({"onnx": spec.to_dict()} if any(a["kind"] == "onnx" for a in artifacts) else {}),
        "artifacts": artifacts,
        "parity": {"status": "not-run"},
        "versions": _versions(),
    }


def export_bundle(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dimensions: int | None = None,
    max_length: int | None = None,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    force: bool = False,
    revision: str | None = None,
    formats: Sequence[str] = ("onnx",),
    gguf_types: Sequence[str] = (),
    progress: bool = False,
    precisions: Sequence[str] | None = None,
    int8_scheme: str | None = None,
) -> ExportResult:
    """Export a checkpoint to a bundle directory: ONNX graph, tokenizer, manifest, report.

    Args:
        source: local checkpoint directory or Hugging Face hub id.
        out: the bundle directory to create.
        dimensions: bake a Matryoshka width into the graph (default: full width).
        max_length: longest input in tokens (default: min(8192, max_position_embeddings)).
        opset: ONNX opset.
        validate: run the parity validator and write its report into the bundle.
        force: replace an existing ``out``.
        revision: hub revision.
        formats: any of ``"onnx"`` and ``"gguf"``.
        gguf_types: GGUF types to write (f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k); implies
            ``"gguf"``; default ``f16`` when ``"gguf"`` is asked for.
        progress: show progress bars on stderr (tracing, writing, validating).
        precisions: ONNX precisions to write besides fp32 (``fp16``, ``int8``, ``int4``);
            fp32 is always written as the reference artifact. For Qwen3-VL they are decoder
            precisions; ``fp16`` also writes an fp16 vision graph.
        int8_scheme: how to build the int8 model (``quantize.INT8_SCHEMES``; default
            ``quantize.DEFAULT_INT8_SCHEME``, ``vl_bundle.VL_DEFAULT_INT8_SCHEME`` for a
            Qwen3-VL decoder).

    Returns:
        The bundle path, its manifest, and the parity report when validated.

    Raises:
        CheckpointError, UnsupportedModelError, InputError, OutputError: see their docs.
    """
    from qwen3emb.export.precisions import check_precisions
    from qwen3emb.export.quantize import DEFAULT_INT8_SCHEME

    onnx_precisions = check_precisions(precisions, int8_scheme)
    out_path = Path(out)
    wanted = _check_formats(formats, gguf_types)
    gguf_list = [t.lower() for t in gguf_types] or (
        [DEFAULT_GGUF_TYPE] if "gguf" in wanted else [])
    checkpoint = load_checkpoint(source, revision=revision)
    family = family_for(checkpoint)
    limit = max_length or min(DEFAULT_MAX_LENGTH, family.max_positions)
    if not 8 <= limit <= family.max_positions:
        raise InputError(f"--max-length {limit} is outside 8..{family.max_positions}",
                         hint="The checkpoint's max_position_embeddings is the upper bound")
    full = family.embedding_dim
    if dimensions is not None and not family.mrl_min <= dimensions <= full:
        raise InputError(f"--dimensions {dimensions} is outside {family.mrl_min}..{full}",
                         hint=f"Choose a Matryoshka width from {family.mrl_min} to {full}")
    writer = family.bundle_writer()
    if writer is not None:  # a multi-graph family writes its own bundle
        return writer(checkpoint, family, out_path, dimensions=dimensions, max_length=limit,
                      opset=opset, validate=validate, force=force, source=str(source),
                      formats=wanted, gguf_types=gguf_list, precisions=onnx_precisions,
                      int8_scheme=int8_scheme)
    out_dim = dimensions or full
    spec = TextGraphSpec(dim=out_dim, opset=opset)
    tokenizer = check_tokenizer(checkpoint.path)

    if gguf_list:
        from qwen3emb.export.gguf import check_types

        check_types(gguf_list)
    with staged_directory(out_path, force=force) as stage:
        artifacts: list[dict[str, Any]] = []
        if "onnx" in wanted:
            from qwen3emb.export.onnx import export_onnx
            from qwen3emb.export.precisions import build_precisions

            onnx_path = export_onnx(family, stage / ONNX_DIR / "model.onnx", spec,
                                    dimensions=dimensions, progress=progress)
            artifacts += build_precisions(stage, onnx_path, spec, onnx_precisions,
                                          int8_scheme=int8_scheme or DEFAULT_INT8_SCHEME,
                                          tokenizer_json=checkpoint.path / "tokenizer.json",
                                          progress=progress)
        if gguf_list:
            from qwen3emb.export.gguf import export_gguf

            for entry in export_gguf(checkpoint.path, stage / GGUF_DIR, gguf_list,
                                     max_length=limit, progress=progress):
                path = stage / GGUF_DIR / entry.pop("path")
                artifacts.append(file_entry(stage, path, **entry))
        for name in TOKENIZER_FILES:
            if (checkpoint.path / name).is_file():
                shutil.copyfile(checkpoint.path / name, stage / name)
                artifacts.append(file_entry(stage, stage / name, kind="tokenizer",
                                            role="tokenizer"))
        manifest = build_manifest(stage, family, source=str(source),
                                  weights=checkpoint.weights_sha256(), spec=spec,
                                  out_dim=out_dim, max_length=limit, tokenizer=tokenizer,
                                  artifacts=artifacts)
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        report = None
        if validate:
            report = _validate_into(stage, checkpoint.path, manifest, progress)
    logger.info("bundle written to %s", out_path)
    return ExportResult(bundle=out_path, manifest=manifest, report=report)


def _validate_into(stage: Path, checkpoint: Path, manifest: dict[str, Any],
                   progress: bool = False) -> Any:
    """Validate the staged bundle and record the verdict and report paths in its manifest."""
    from qwen3emb.validate import validate_bundle

    report = validate_bundle(stage, checkpoint, progress=progress)
    record_parity(stage, manifest, report, key="precision")
    return report


def record_parity(stage: Path, manifest: dict[str, Any], report: Any, key: str) -> None:
    """Write the three report formats into the staged bundle and the verdict into its manifest.

    Args:
        key: the artifact attribute that keys ``min_cosine`` (``precision`` or ``artifact``).
    """
    from qwen3emb.validate.report import write_report

    reports = stage / REPORTS_DIR
    write_report(report, json_path=reports / "parity.json", markdown_path=reports / "parity.md",
                 junit_path=reports / "parity.junit.xml")
    manifest["parity"] = {
        "status": "passed" if report.passed else "failed",
        "report": f"{REPORTS_DIR}/parity.json",
        "markdown": f"{REPORTS_DIR}/parity.md",
        "junit": f"{REPORTS_DIR}/parity.junit.xml",
        "reference_precision": report.reference["precision"],
        "min_cosine": {getattr(a, key): round(a.min_cosine, 8) for a in report.artifacts},
    }
    write_json_atomic(stage / MANIFEST_FILE, manifest)
