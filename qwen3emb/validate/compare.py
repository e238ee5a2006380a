"""Parity metrics: cosine to the reference, differences, NaN/Inf, retrieval agreement."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from qwen3emb.validate.retrieval import RetrievalReport


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows, in float64 (NaN rows give NaN)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def top1_agreement(queries: np.ndarray, docs: np.ndarray, ref_queries: np.ndarray,
                   ref_docs: np.ndarray) -> float:
    """Fraction of queries whose best document is the same for artifact and reference."""
    mine = np.argmax(queries @ docs.T, axis=1)
    theirs = np.argmax(ref_queries @ ref_docs.T, axis=1)
    return float(np.mean(mine == theirs))


@dataclass
class ArtifactResult:
    """Everything measured for one artifact against the reference."""

    artifact: str
    kind: str
    precision: str
    floor: float
    cosines: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    nan_inf: int = 0
    retrieval_top1_agreement: float | None = None
    batch_vs_single_max_diff: float | None = None
    error: str | None = None
    informational: bool = False
    """Measured and reported, never gated: the report passes whatever its cosines are."""
    note: str | None = None
    """What this artifact measures or leaves out, shown in the report."""
    checked_on: str | None = None
    """What ran it: the engine, its provider and, for int8, the integer kernel."""
    engine: str | None = None
    """A row's engine where it is not the default onnxruntime/llama.cpp (``openvino:CPU``):
    the same artifact checked on several engines has a row for each."""

    @property
    def name(self) -> str:
        """The artifact, with its engine where that is not the default."""
        return f"{self.artifact} @ {self.engine}" if self.engine else self.artifact

    def add(self, label: str, names: list[str], output: np.ndarray, reference: np.ndarray) -> None:
        """Record per-row cosines of ``output`` vs ``reference`` under ``label:name`` keys."""
        bad = ~np.isfinite(output)
        self.nan_inf += int(bad.sum())
        cos = row_cosines(np.where(bad, 0.0, output), reference)
        for name, value in zip(names, cos):
            self.cosines[f"{label}:{name}"] = float(value) if np.isfinite(value) else -1.0
        finite = np.where(bad, np.inf, np.abs(output.astype(np.float64) - reference))
        self.max_abs_diff = max(self.max_abs_diff, float(finite.max()))

    @property
    def min_cosine(self) -> float:
        return min(self.cosines.values()) if self.cosines else float("nan")

    @property
    def mean_cosine(self) -> float:
        return float(np.mean(list(self.cosines.values()))) if self.cosines else float("nan")

    @property
    def p50_cosine(self) -> float:
        return float(np.median(list(self.cosines.values()))) if self.cosines else float("nan")

    @property
    def worst(self) -> list[tuple[str, float]]:
        """The five probes furthest from the reference."""
        return sorted(self.cosines.items(), key=lambda kv: kv[1])[:5]

    @property
    def failures(self) -> list[str]:
        """Why this artifact fails, one line each; empty when it passes."""
        out: list[str] = []
        if self.error:
            out.append(self.error)
        if self.nan_inf:
            out.append(f"{self.nan_inf} NaN/Inf values in the output")
        if self.cosines and not self.min_cosine >= self.floor:
            name, value = self.worst[0]
            out.append(f"min cosine {value:.6f} < floor {self.floor} (probe {name})")
        if not self.cosines and not self.error:
            out.append("no probes were compared")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(min_cosine=self.min_cosine, mean_cosine=self.mean_cosine,
                    p50_cosine=self.p50_cosine, passed=self.passed, failures=self.failures,
                    worst=[{"probe": k, "cosine": v} for k, v in self.worst])
        return data


@dataclass
class ParityReport:
    """The result of validating a bundle: one entry per artifact, plus context."""

    bundle: str
    reference: dict[str, Any]
    probe_max_length: int
    probe_count: int
    artifacts: list[ArtifactResult]
    tool_version: str
    created: str
    seconds: float = 0.0
    retrieval: RetrievalReport | None = None
    """Scores on a BEIR set (``validate --eval-set``); gates only with a max drop."""

    @property
    def passed(self) -> bool:
        return (bool(self.artifacts) and all(a.passed or a.informational for a in self.artifacts)
                and (self.retrieval is None or self.retrieval.passed))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "bundle": self.bundle,
            "reference": self.reference,
            "probe_max_length": self.probe_max_length,
            "probe_count": self.probe_count,
            "tool_version": self.tool_version,
            "created": self.created,
            "seconds": round(self.seconds, 2),
            "artifacts": [a.to_dict() for a in self.artifacts],
            "retrieval": None if self.retrieval is None else self.retrieval.to_dict(),
        }
