"""Write a ParityReport as JSON (machines), Markdown (CI job summaries) and JUnit XML (CI tabs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from qwen3emb.errors import OutputError
from qwen3emb.validate.compare import ParityReport


def to_json(report: ParityReport) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"


def to_markdown(report: ParityReport) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    ref = report.reference
    lines = [
        f"## qwen3emb parity report: {verdict}",
        "",
        f"Reference: `{ref.get('source')}` ({ref.get('implementation')}, {ref.get('precision')}); "
        f"{report.probe_count} probe inputs, probe max length {report.probe_max_length} tokens.",
        "",
        "| artifact | precision | floor | min cos | mean cos | p50 cos | max abs diff | NaN/Inf "
        "| top-1 agreement | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report.artifacts:
        agree = "n/a" if a.retrieval_top1_agreement is None else f"{a.retrieval_top1_agreement:.2f}"
        lines.append(
            f"| `{a.artifact}` | {a.precision} | {a.floor} | {a.min_cosine:.7f} | "
            f"{a.mean_cosine:.6f} | {a.p50_cosine:.6f} | {a.max_abs_diff:.2e} | {a.nan_inf} | "
            f"{agree} | {_verdict(a)} |"
        )
    for a in report.artifacts:
        lines += ["", f"**{a.artifact}** worst probes: "
                  + ", ".join(f"`{k}` {v:.6f}" for k, v in a.worst)]
        if a.batch_vs_single_max_diff is not None:
            lines.append(f"batch vs single max abs diff: {a.batch_vs_single_max_diff:.2e}")
        if a.note:
            lines.append(f"note: {a.note}")
        for failure in a.failures:
            lines.append(f"- {'measured, not gated' if a.informational else 'FAIL'}: {failure}")
    return "\n".join(lines) + "\n"


def _verdict(a: Any) -> str:
    if a.informational:
        return "reported (not gated)"
    return "pass" if a.passed else "FAIL"


def to_junit(report: ParityReport) -> str:
    suite = ET.Element("testsuite", name="qwen3emb-parity", time=f"{report.seconds:.2f}")
    failures = 0
    cases = 0
    for a in report.artifacts:
        checks = {
            "floor": (a.informational or (a.cosines and a.min_cosine >= a.floor),
                      f"min cosine {a.min_cosine:.6f} vs floor {a.floor}"
                      + (" (reported, not gated)" if a.informational else "")),
            "finite": (a.nan_inf == 0, f"{a.nan_inf} NaN/Inf values"),
            "runs": (a.error is None, a.error or "ran"),
        }
        for check, (ok, message) in checks.items():
            cases += 1
            case = ET.SubElement(suite, "testcase", classname=f"parity.{a.precision}",
                                 name=f"{a.artifact}::{check}")
            ET.SubElement(case, "system-out").text = message
            if not ok:
                failures += 1
                ET.SubElement(case, "failure", message=message).text = "\n".join(a.failures)
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
