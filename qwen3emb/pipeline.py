"""Export, then validate: the one job the CLI and the demo run. It composes the writer
(:mod:`qwen3emb.export`) with the validator (:mod:`qwen3emb.validate`), which never import
each other."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen3emb.constants import MANIFEST_FILE, REPORTS_DIR
from qwen3emb.export import ExportResult, write_bundle
from qwen3emb.export.bundle.card import write_model_card
from qwen3emb.manifest import write_json_atomic


def export_bundle(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  validate: bool = True, progress: bool = False,
                  long_probes: Sequence[int] | None = None, **options: Any) -> ExportResult:
    """Export a checkpoint to a bundle and, unless ``validate`` is false, check its parity
    against the HuggingFace reference before the bundle is moved into place.

    Args:
        source: local checkpoint directory or Hugging Face hub id.
        out: the bundle directory to create.
        validate: run the parity validator and write its report into the bundle.
        progress: progress bars on stderr.
        long_probes: token lengths of the validator's long-document probes (default: its
            own, 2048 / 8192 / 32768 capped at max_length; ``()`` for none).
        **options: the options of :func:`qwen3emb.export.write_bundle` (``dimensions``,
            ``max_length``, ``opset``, ``force``, ``revision``, ``formats``, ``gguf_types``,
            ``precisions``, ``int8_scheme``, ``targets``).

    Returns:
        The bundle, its manifest and the parity report (``None`` without ``validate``).

    Raises:
        CheckpointError, UnsupportedModelError, InputError, OutputError: see their docs.
    """
    check = None
    if validate:
        def check(stage: Path, manifest: dict[str, Any], backbone: Any) -> Any:
            from qwen3emb.validate import validate_bundle

            report = validate_bundle(stage, source, model=backbone, progress=progress,
                                     long_probes=long_probes)
            record_parity(stage, manifest, report)
            return report

    return write_bundle(source, out, progress=progress, check=check, **options)


def record_parity(stage: Path, manifest: dict[str, Any], report: Any) -> None:
    """Write the three report formats into the staged bundle and the verdict into its
    manifest (``min_cosine``, or a reranker's ``max_abs_score_diff``, keyed by precision when
    each artifact has its own, else by artifact)."""
    from qwen3emb.validate.report import write_report

    reports = stage / REPORTS_DIR
    write_report(report, json_path=reports / "parity.json", markdown_path=reports / "parity.md",
                 junit_path=reports / "parity.junit.xml")
    unique = len({a.precision for a in report.artifacts}) == len(report.artifacts)
    key = "precision" if unique else "artifact"
    manifest["parity"] = {
        "status": "passed" if report.passed else "failed",
        "report": f"{REPORTS_DIR}/parity.json",
        "markdown": f"{REPORTS_DIR}/parity.md",
        "junit": f"{REPORTS_DIR}/parity.junit.xml",
        "reference_precision": report.reference["precision"],
    }
    if all(hasattr(a, "max_abs_score_diff") for a in report.artifacts):
        manifest["parity"]["max_abs_score_diff"] = {
            getattr(a, key): float(f"{a.max_abs_score_diff:.3e}") for a in report.artifacts}
    else:
        manifest["parity"]["min_cosine"] = {getattr(a, key): round(a.min_cosine, 8)
                                            for a in report.artifacts}
    write_json_atomic(stage / MANIFEST_FILE, manifest)
    write_model_card(stage, manifest)  # its parity table
