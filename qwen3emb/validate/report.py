"""Write a ParityReport as JSON (machines), Markdown (CI job summaries) and JUnit XML (CI tabs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from qwen3emb.errors import OutputError
from qwen3emb.validate.compare import ParityReport
from qwen3emb.validate.retrieval import RetrievalReport


def to_json(report: ParityReport) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"


def _scored(report: ParityReport) -> bool:
    """A reranker's report: artifacts measured on the score, not on cosine."""
    return bool(report.artifacts) and all(hasattr(a, "score_diffs") for a in report.artifacts)


def _score_markdown(report: ParityReport, verdict: str) -> str:
    ref = report.reference
    lines = [
        f"## qwen3emb parity report: {verdict}",
        "",
        f"Reference: `{ref.get('source')}` ({ref.get('implementation')}, {ref.get('precision')}); "
        f"{report.probe_count} query/document pairs, max length {report.probe_max_length} "
        "tokens; each pair scored in batches and alone.",
        "",
        "| artifact | precision | floor (max abs score diff) | max abs score diff | "
        "max abs logit diff | min Kendall tau | top-1 agreement | batch vs single | NaN/Inf "
        "| checked on | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report.artifacts:
        tau = "n/a" if a.min_kendall_tau is None else f"{a.min_kendall_tau:.3f}"
        agree = "n/a" if a.top1_agreement is None else f"{a.top1_agreement:.2f}"
        single = ("n/a" if a.batch_vs_single_max_diff is None
                  else f"{a.batch_vs_single_max_diff:.2e}")
        lines.append(
            f"| `{a.name}` | {a.precision} | {a.floor} | {a.max_abs_score_diff:.2e} | "
            f"{a.max_abs_logit_diff:.2e} | {tau} | {agree} | {single} | {a.nan_inf} | "
            f"{a.checked_on or 'n/a'} | {_verdict(a)} |")
    for a in report.artifacts:
        lines += ["", f"**{a.name}** worst probes: "
                  + ", ".join(f"`{k}` {v:.2e}" for k, v in a.worst)]
        for failure in a.failures:
            lines.append(f"- {'measured, not gated' if a.informational else 'FAIL'}: {failure}")
    if report.retrieval is not None:
        lines += retrieval_markdown(report.retrieval)
    return "\n".join(lines) + "\n"


def to_markdown(report: ParityReport) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    if _scored(report):
        return _score_markdown(report, verdict)
    ref = report.reference
    lines = [
        f"## qwen3emb parity report: {verdict}",
        "",
        f"Reference: `{ref.get('source')}` ({ref.get('implementation')}, {ref.get('precision')}); "
        f"{report.probe_count} probe inputs, probe max length {report.probe_max_length} tokens.",
        "",
        "| artifact | precision | floor | min cos | mean cos | p50 cos | max abs diff | NaN/Inf "
        "| top-1 agreement | checked on | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report.artifacts:
        agree = "n/a" if a.retrieval_top1_agreement is None else f"{a.retrieval_top1_agreement:.2f}"
        lines.append(
            f"| `{a.name}` | {a.precision} | {a.floor} | {a.min_cosine:.7f} | "
            f"{a.mean_cosine:.6f} | {a.p50_cosine:.6f} | {a.max_abs_diff:.2e} | {a.nan_inf} | "
            f"{agree} | {a.checked_on or 'n/a'} | {_verdict(a)} |"
        )
    for a in report.artifacts:
        lines += ["", f"**{a.name}** worst probes: "
                  + ", ".join(f"`{k}` {v:.6f}" for k, v in a.worst)]
        if a.batch_vs_single_max_diff is not None:
            lines.append(f"batch vs single max abs diff: {a.batch_vs_single_max_diff:.2e}")
        if a.note:
            lines.append(f"note: {a.note}")
        for failure in a.failures:
            lines.append(f"- {'measured, not gated' if a.informational else 'FAIL'}: {failure}")
    if report.retrieval is not None:
        lines += retrieval_markdown(report.retrieval)
    return "\n".join(lines) + "\n"


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def retrieval_markdown(section: RetrievalReport) -> list[str]:
    """The retrieval section: the reference's nDCG@10 / recall@10 and each artifact's."""
    ref = section.reference
    gate = (f"gated: an artifact fails when its nDCG@10 drops more than {section.max_drop} "
            "below the reference's" if section.gated else "reported, not gated")
    lines = [
        "", "### Retrieval quality", "",
        f"Eval set `{section.eval_set}` (split `{section.split}`): {section.queries} queries, "
        f"{section.documents} documents, {section.judgments} judgments; max length "
        f"{section.max_length} tokens; "
        + (f"each query's candidates ({section.candidates}, {ref.get('pairs')} pairs) "
           f"reranked with the instruction '{section.task}'"
           if section.candidates else
           f"queries with the instruction (task: {section.task}), documents without")
        + f"; metrics by {section.library}; Δ = artifact minus reference; {gate}.",
        "",
        "| model | precision | dims | nDCG@10 | Δ nDCG@10 | recall@10 | Δ recall@10 "
        "| top-10 overlap with reference | result |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| reference ({ref.get('precision')}) | - | {ref.get('dimensions')} | "
        f"{_num(ref.get('ndcg_at_10'))} | - | {_num(ref.get('recall_at_10'))} | - | - | - |",
    ]
    if first := ref.get("first_stage"):
        lines.append(f"| first stage (the run's own order) | - | - | "
                     f"{_num(first.get('ndcg_at_10'))} | - | {_num(first.get('recall_at_10'))} "
                     "| - | - | - |")
    for row in section.rows:
        failures = row.failures(section.max_drop)
        result = ("FAIL" if failures else "pass") if section.gated else "reported"
        if row.error:
            result = f"error: {row.error}"
        lines.append(
            f"| `{row.artifact}` | {row.precision} | {row.dimensions or 'n/a'} | "
            f"{_num(row.ndcg_at_10)} | {_num(_neg(row.ndcg_drop), True)} | "
            f"{_num(row.recall_at_10)} | {_num(_neg(row.recall_drop), True)} | "
            f"{_num(row.overlap_at_10)} | {result} |")
    if section.skipped_documents:
        lines.append(f"\n{section.skipped_documents} documents without title or text skipped.")
    return lines


def _neg(value: float | None) -> float | None:
    """Show a drop as the change from the reference (negative: worse than the reference)."""
    return None if value is None else 0.0 - value


def _verdict(a: Any) -> str:
    if a.informational:
        return "reported (not gated)"
    return "pass" if a.passed else "FAIL"


def to_junit(report: ParityReport) -> str:
    suite = ET.Element("testsuite", name="qwen3emb-parity", time=f"{report.seconds:.2f}")
    failures = 0
    cases = 0
    scored = _scored(report)
    for a in report.artifacts:
        floor = ((a.informational or (a.score_diffs and a.max_abs_score_diff <= a.floor)),
                 f"max |score diff| {a.max_abs_score_diff:.2e} vs floor {a.floor}") if scored \
            else ((a.informational or (a.cosines and a.min_cosine >= a.floor)),
                  f"min cosine {a.min_cosine:.6f} vs floor {a.floor}")
        checks = {
            "floor": (floor[0], floor[1] + (" (reported, not gated)" if a.informational else "")),
            "finite": (a.nan_inf == 0, f"{a.nan_inf} NaN/Inf values"),
            "runs": (a.error is None, a.error or "ran"),
        }
        for check, (ok, message) in checks.items():
            cases += 1
            case = ET.SubElement(suite, "testcase", classname=f"parity.{a.precision}",
                                 name=f"{a.name}::{check}")
            ET.SubElement(case, "system-out").text = message
            if not ok:
                failures += 1
                ET.SubElement(case, "failure", message=message).text = "\n".join(a.failures)
    if report.retrieval is not None:
        section = report.retrieval
        for row in section.rows:
            cases += 1
            message = (f"nDCG@10 {_num(row.ndcg_at_10)} vs reference "
                       f"{_num(row.reference_ndcg_at_10)}, recall@10 {_num(row.recall_at_10)} "
                       f"vs {_num(row.reference_recall_at_10)}"
                       + ("" if section.gated else " (reported, not gated)"))
            case = ET.SubElement(suite, "testcase", classname=f"retrieval.{row.precision}",
                                 name=f"{row.artifact}::retrieval")
            ET.SubElement(case, "system-out").text = row.error or message
            if row_failures := row.failures(section.max_drop):
                failures += 1
                ET.SubElement(case, "failure", message=row_failures[0]).text = message
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def write_report(report: ParityReport, *, json_path: str | os.PathLike[str] | None = None,
                 markdown_path: str | os.PathLike[str] | None = None,
                 junit_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write the requested formats; each file is written whole or not at all.

    Raises:
        OutputError: a target cannot be written.
    """
    written: list[Path] = []
    for path, render in ((json_path, to_json), (markdown_path, to_markdown),
                         (junit_path, to_junit)):
        if path is None:
            continue
        target = Path(path)
        tmp = target.with_name(target.name + ".partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(render(report), encoding="utf-8")
            os.replace(tmp, target)
        except OSError as e:
            raise OutputError(f"cannot write report '{target}': {e.strerror or e}",
                              hint="Choose a writable path") from e
        written.append(target)
    return written
