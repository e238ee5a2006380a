"""Write a bundle of any family: ONNX graphs and their precisions, GGUF files, tokenizer and
support files, manifest. What differs per family comes from its :class:`Family` hooks."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3emb import __version__
from qwen3emb.constants import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    DEFAULT_GGUF_TYPE,
    DEFAULT_OPSET,
    FORMATS,
    GGUF_DIR,
    MANIFEST_FILE,
    TOKENIZER_FILES,
)
from qwen3emb.convert import Family, family_for, load_checkpoint
from qwen3emb.errors import CheckpointError, InputError
from qwen3emb.export.bundle.card import write_model_card
from qwen3emb.export.bundle.interop import write_interop_files
from qwen3emb.export.bundle.staging import check_loadable, staged_directory
from qwen3emb.manifest import file_entry, write_json_atomic

logger = logging.getLogger(__name__)

Check = Callable[[Path, dict[str, Any], Any], Any]
"""``check(stage, manifest, backbone) -> report``: run on the staged, load-checked bundle
before it is moved into place (the parity validator; see :mod:`qwen3emb.pipeline`).
``backbone`` is the loaded fp32 model when the export loaded one, else ``None``."""


@dataclass(frozen=True)
class ExportResult:
    """What an export produced."""

    bundle: Path
    manifest: dict[str, Any]
    report: Any = None  # a ParityReport when validated

    @property
    def passed(self) -> bool | None:
        return None if self.report is None else bool(self.report.passed)


def write_bundle(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dimensions: int | None = None,
    max_length: int | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    revision: str | None = None,
    formats: Sequence[str] = ("onnx",),
    gguf_types: Sequence[str] = (),
    progress: bool = False,
    precisions: Sequence[str] | None = None,
    int8_scheme: str | None = None,
    targets: Sequence[str] | None = None,
    check: Check | None = None,
    task: str | None = None,
) -> ExportResult:
    """Export a checkpoint of any supported family to a bundle directory.

    Args:
        source: local checkpoint directory or Hugging Face hub id.
        out: the bundle directory to create.
        dimensions: bake a Matryoshka width into the graph (default: full width).
        max_length: longest input in tokens (default: the family's ``default_max_length``: the
            checkpoint's max_position_embeddings for text, 8192 for Qwen3-VL).
        opset: ONNX opset.
        force: replace an existing ``out``.
        revision: hub revision.
        formats: any of ``"onnx"`` and ``"gguf"``.
        gguf_types: GGUF types to write (f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k); implies
            ``"gguf"``; default ``f16`` when ``"gguf"`` is asked for.
        progress: show progress bars on stderr.
        precisions: ONNX precisions besides fp32 (``fp16``, ``int8``, ``int4``); each graph
            of the family is written in those it supports (:meth:`Family.graph_precisions`).
        int8_scheme: force an int8 recipe (default: per graph, what the family's
            :meth:`Family.graph_quantization` says: the accuracy-driven search,
            :mod:`qwen3emb.export.quant.search`, or its fixed recipe).
        targets: ``PRECISION=COSINE`` calibration targets of the search (``int8=0.9994``),
            replacing its default aim (:func:`qwen3emb.export.quant.precisions.check_targets`).
        check: run on the staged bundle before it is moved into place; its return value is
            the result's ``report``.
        task: ``"embed"`` or ``"rerank"``; ``None`` picks ``rerank`` when ``source``'s name
            contains "reranker" (config and weights cannot tell them apart), and says so.

    Returns:
        The bundle path, its manifest, and ``check``'s report.

    Raises:
        CheckpointError, UnsupportedModelError, InputError, OutputError: see their docs.
        OutputError also when a written graph or GGUF does not load; nothing is moved into
        place then.
    """
    from qwen3emb.export.quant.precisions import check_precisions, check_targets

    onnx_precisions = check_precisions(precisions, int8_scheme)
    aims = check_targets(targets, onnx_precisions, int8_scheme)
    out_path = Path(out)
    wanted = _check_formats(formats, gguf_types)
    gguf_list = [t.lower() for t in gguf_types] or (
        [DEFAULT_GGUF_TYPE] if "gguf" in wanted else [])
    from qwen3emb.convert.qwen3_reranker import task_for

    chosen, why = task_for(str(source), task)
    checkpoint = load_checkpoint(source, revision=revision)
    family = family_for(checkpoint, chosen)
    if chosen == "rerank":
        _check_reranker_options(dimensions, aims)
    limit = max_length or family.default_max_length
    if not 8 <= limit <= family.max_positions:
        raise InputError(f"--max-length {limit} is outside 8..{family.max_positions}",
                         hint="The checkpoint's max_position_embeddings is the upper bound")
    full = family.embedding_dim
    if dimensions is not None and not family.mrl_min <= dimensions <= full:
        raise InputError(f"--dimensions {dimensions} is outside {family.mrl_min}..{full}",
                         hint=f"Choose a Matryoshka width from {family.mrl_min} to {full}")
    out_dim = dimensions or full
    specs = family.graph_specs(out_dim, opset)
    tokenizer = family.check_tokenizer(load_tokenizer_json(checkpoint.path))
    if gguf_list:
        from qwen3emb.export.gguf import gguf_writer
        from qwen3emb.export.gguf.common import check_types

        check_types(gguf_list)
        gguf_writer(family)  # an unsupported family fails before any work
        family.gguf_options()
    with staged_directory(out_path, force=force) as stage:
        if task is None:
            # Loud when the name made the export a reranker; an embedder is the default. Said
            # once the inputs (and the output path) are checked: a refused export prints only
            # its error.
            (logger.warning if chosen == "rerank" else logger.info)(
                "task: %s (from the name '%s'; pass --task %s to override)", chosen, source,
                "embed" if chosen == "rerank" else "rerank")
        # Copied first: calibration of some graphs runs the staged bundle's tokenizer.
        support = _copy_support_files(family, stage)
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            **family.describe(),
            "task_source": why,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"model": str(source), "weights": checkpoint.weights_sha256()},
            **family.manifest_sections(out_dim, onnx="onnx" in wanted, gguf=bool(gguf_list)),
            "tokenizer": {**tokenizer, "max_length": limit,
                          "files": [a["path"] for a in support if a.get("role") == "tokenizer"]},
            "artifacts": support,
            "parity": {"status": "not-run"},
            "versions": versions(),
        }
        artifacts: list[dict[str, Any]] = []
        backbone = None
        if "onnx" in wanted:
            from qwen3emb.export.bundle.graphs import write_graphs

            manifest["onnx"] = (specs[0].to_dict() if len(specs) == 1
                                else {spec.name: spec.to_dict() for spec in specs})
            backbone, entries = write_graphs(
                family, stage, specs, manifest, dimensions=dimensions,
                precisions=onnx_precisions, int8_scheme=int8_scheme, targets=aims,
                keep_backbone=check is not None, progress=progress)
            artifacts += entries
        if gguf_list:
            artifacts += _write_gguf(family, stage, gguf_list, limit, progress)
        interop = write_interop_files(family, stage, manifest, artifacts)
        manifest["artifacts"] = artifacts + support + interop
        check_loadable(stage, artifacts)
        write_json_atomic(stage / MANIFEST_FILE, manifest)
        write_model_card(stage, manifest)
        report = check(stage, manifest, backbone) if check is not None else None
    logger.info("bundle written to %s", out_path)
    return ExportResult(bundle=out_path, manifest=manifest, report=report)


def _check_reranker_options(dimensions: int | None, targets: dict[str, float]) -> None:
    """What reranker bundles do not hold, refused before any work."""
    if dimensions is not None:
        raise InputError("--dimensions cuts embeddings; a reranker outputs one score",
                         hint="Drop --dimensions, or pass --task embed")
    if targets:
        raise InputError("--target aims the embedders' calibration cosine; a reranker's search "
                         "aims at half its score floor", hint="Drop --target for rerankers")


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


def _copy_support_files(family: Family, stage: Path) -> list[dict[str, Any]]:
    entries = []
    source = family.checkpoint.path
    for name in (*TOKENIZER_FILES, *family.support_files):
        if (source / name).is_file():
            shutil.copyfile(source / name, stage / name)
            role = "tokenizer" if name in TOKENIZER_FILES else "processor"
            entries.append(file_entry(stage, stage / name, kind=role, role=role))
    return entries


def _write_gguf(family: Family, stage: Path, types: list[str], max_length: int,
                progress: bool) -> list[dict[str, Any]]:
    """Manifest entries of the family's GGUF files (paths relative to the bundle)."""
    from qwen3emb.export.gguf import gguf_writer

    artifacts = []
    for entry in gguf_writer(family)(family.checkpoint.path, stage / GGUF_DIR, types,
                                     max_length=max_length, progress=progress,
                                     **family.gguf_options()):
        path = stage / GGUF_DIR / entry.pop("path")
        if "mmproj" in entry:
            entry["mmproj"] = f"{GGUF_DIR}/{entry['mmproj']}"
        artifacts.append(file_entry(stage, path, **entry))
    return artifacts


def versions() -> dict[str, str]:
    """Versions of this tool and the libraries that shaped the bundle."""
    import importlib.metadata as md

    out = {"qwen3emb-export": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers",
                 "numpy", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
