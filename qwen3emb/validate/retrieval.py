"""Retrieval quality on a BEIR set: nDCG@10 and recall@10 of every artifact beside the
reference's own, computed by ``ir-measures`` (trec_eval's code, as BEIR's numbers are).

Cosine floors say how close each vector is to the reference; this says what the differences
cost a search system. Queries get the instruction, documents none. By default the scores are
reported, not gated (see docs/eval-set.md); ``EvalRequest.max_drop`` turns an nDCG@10 drop
larger than it into a failure.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import DEFAULT_TASK
from qwen3emb.errors import InputError, Qwen3EmbError
from qwen3emb.progress import bar
from qwen3emb.validate.eval_set import DEFAULT_SPLIT, EvalSet

logger = logging.getLogger(__name__)

K = 10
"""Cut-off of both metrics (BEIR's headline nDCG@10)."""
RUN_DEPTH = 100
"""Documents kept per query in the run handed to the metrics (BEIR keeps 1000; @10 needs 10)."""
EVAL_MAX_LENGTH = 512
"""Default truncation of queries and documents, or the bundle's max_length if smaller."""
LIBRARY = "ir-measures"


@dataclass(frozen=True)
class EvalRequest:
    """What to score: a BEIR directory, its split, the query task, truncation, the gate.

    Args:
        path: the BEIR set's directory.
        split: the qrels split (``qrels/<split>.tsv``).
        task: the query instruction's task (default: the model card's web-search task).
        max_length: truncation of queries and documents in tokens (default:
            min(512, the bundle's max_length)).
        max_drop: gate: fail an artifact whose nDCG@10 is more than this below the
            reference's (absolute, 0..1). ``None`` (default): reported, not gated.
        candidates: rerankers: a TREC run file of a first stage whose candidates are reranked
            (default: the whole corpus, for small sets).
        candidates_depth: rerankers: how many of each query's best candidates are reranked.

    Raises:
        InputError: a blank task or split, max_length < 8, max_drop outside 0..1, or a
            candidates depth below 1.
    """

    path: str | os.PathLike[str]
    split: str = DEFAULT_SPLIT
    task: str | None = None
    max_length: int | None = None
    max_drop: float | None = None
    candidates: str | os.PathLike[str] | None = None
    candidates_depth: int = 100

    def __post_init__(self) -> None:
        if self.candidates_depth < 1:
            raise InputError(f"candidates depth {self.candidates_depth} is below 1",
                             hint="Rerank at least one candidate per query (default 100)")
        if not self.split.strip():
            raise InputError("eval split is empty", hint=f"Omit it to use '{DEFAULT_SPLIT}'")
        if self.task is not None and not self.task.strip():
            raise InputError("eval task is empty", hint="Omit it to use the default task")
        if self.max_length is not None and self.max_length < 8:
            raise InputError(f"eval max length {self.max_length} is below 8",
                             hint="Choose at least 8 tokens (default 512)")
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 1.0:
            raise InputError(f"eval max drop {self.max_drop} is outside 0..1",
                             hint="Give an absolute nDCG@10 drop, e.g. 0.01")


@dataclass
class RetrievalRow:
    """One artifact's scores and the reference's at the same width."""

    artifact: str
    kind: str
    precision: str
    dimensions: int = 0
    ndcg_at_10: float | None = None
    recall_at_10: float | None = None
    reference_ndcg_at_10: float | None = None
    reference_recall_at_10: float | None = None
    overlap_at_10: float | None = None
    """Mean share of the reference's top 10 that the artifact also ranks in its top 10."""
    error: str | None = None

    def record(self, scores: dict[str, float], reference: dict[str, Any],
               overlap: float) -> None:
        """Fill in the artifact's metrics, the reference's beside them, and the overlap."""
        self.ndcg_at_10, self.recall_at_10 = scores["ndcg_at_10"], scores["recall_at_10"]
        self.reference_ndcg_at_10 = reference["ndcg_at_10"]
        self.reference_recall_at_10 = reference["recall_at_10"]
        self.overlap_at_10 = overlap

    @property
    def ndcg_drop(self) -> float | None:
        """Reference nDCG@10 minus the artifact's (positive: the artifact retrieves worse)."""
        if self.ndcg_at_10 is None or self.reference_ndcg_at_10 is None:
            return None
        return self.reference_ndcg_at_10 - self.ndcg_at_10

    @property
    def recall_drop(self) -> float | None:
        if self.recall_at_10 is None or self.reference_recall_at_10 is None:
            return None
        return self.reference_recall_at_10 - self.recall_at_10

    def failures(self, max_drop: float | None) -> list[str]:
        """Why this row fails the gate; always empty when ``max_drop`` is None (not gated)."""
        if max_drop is None:
            return []
        if self.error:
            return [self.error]
        drop = self.ndcg_drop
        if drop is not None and drop > max_drop:
            return [f"nDCG@10 {self.ndcg_at_10:.4f} is {drop:.4f} below the reference's "
                    f"{self.reference_ndcg_at_10:.4f} (max drop {max_drop})"]
        return []


@dataclass
class RetrievalReport:
    """The retrieval section of a parity report."""

    eval_set: str
    split: str
    queries: int
    documents: int
    judgments: int
    max_length: int
    task: str
    reference: dict[str, Any]
    rows: list[RetrievalRow]
    max_drop: float | None = None
    skipped_documents: int = 0
    library: str = LIBRARY
    seconds: float = 0.0
    metrics: tuple[str, ...] = field(default=(f"nDCG@{K}", f"R@{K}"))
    candidates: str | None = None
    """Rerankers: what was reranked (a run file, or the whole corpus); None for embedders."""

    @property
    def gated(self) -> bool:
        return self.max_drop is not None

    @property
    def passed(self) -> bool:
        return all(not row.failures(self.max_drop) for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(gated=self.gated, passed=self.passed, seconds=round(self.seconds, 2))
        data["rows"] = [dict(asdict(r), ndcg_drop=r.ndcg_drop, recall_drop=r.recall_drop,
                             failures=r.failures(self.max_drop)) for r in self.rows]
        return data


def _ir_measures() -> Any:
    try:
        import ir_measures
    except ImportError as e:
        from qwen3emb.errors import MissingDependencyError

        raise MissingDependencyError(
            "'ir-measures' is not installed, and retrieval evaluation needs it",
            hint="Install it with: pip install 'qwen3emb-export[eval]'") from e
    return ir_measures


def rank(queries: np.ndarray, docs: np.ndarray, eval_set: EvalSet, depth: int = RUN_DEPTH
         ) -> tuple[np.ndarray, np.ndarray]:
    """The ``depth`` best documents per query by dot product (unit vectors: cosine).

    A document whose id equals its query's id is never returned (BEIR's
    ``ignore_identical_ids``, which matters for sets such as ArguAna and Quora).

    Returns:
        (indices [n_queries, depth'], scores [n_queries, depth']), best first.
    """
    depth = min(depth, docs.shape[0])
    position = {d: i for i, d in enumerate(eval_set.doc_ids)}
    top_i = np.empty((len(queries), depth), dtype=np.int64)
    top_s = np.empty((len(queries), depth), dtype=np.float32)
    for start in range(0, len(queries), 256):  # bounded memory on large corpora
        scores = queries[start:start + 256] @ docs.T
        for row, qid in enumerate(eval_set.query_ids[start:start + 256]):
            if qid in position:
                scores[row, position[qid]] = -np.inf
        part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        top_i[start:start + 256] = np.take_along_axis(part, order, axis=1)
        top_s[start:start + 256] = np.take_along_axis(part_scores, order, axis=1)
    return top_i, top_s


def score_run(top_i: np.ndarray, top_s: np.ndarray, eval_set: EvalSet) -> dict[str, float]:
    """nDCG@10 and recall@10 of a ranked run, averaged over the judged queries."""
    ir = _ir_measures()
    qrels = [ir.Qrel(q, d, rel) for q, docs in eval_set.qrels.items() for d, rel in docs.items()]
    run = [ir.ScoredDoc(qid, eval_set.doc_ids[i], float(s))
           for qid, idx, sc in zip(eval_set.query_ids, top_i, top_s)
           for i, s in zip(idx, sc) if np.isfinite(s)]
    ndcg, recall = ir.nDCG @ K, ir.R @ K
    values = ir.calc_aggregate([ndcg, recall], qrels, run)
    return {"ndcg_at_10": float(values[ndcg]), "recall_at_10": float(values[recall])}


def overlap_at_k(mine: np.ndarray, theirs: np.ndarray, k: int = K) -> float:
    """Mean share of ``theirs``' top k found in ``mine``'s top k, per query."""
    k = min(k, mine.shape[1])
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(mine, theirs)]))


def evaluate_text_bundle(suite: Any, eval_set: EvalSet, request: EvalRequest,
                         precisions: Sequence[str] | None = None, progress: bool = False
                         ) -> RetrievalReport:
    """Score the reference and every artifact of a text bundle on ``eval_set``.

    Args:
        suite: the :class:`~qwen3emb.validate.text.TextSuite` that has run (its reference
            model is reused).
        eval_set: the loaded set.
        request: split, task, truncation and gate.
        precisions: only these artifacts (default: all).
        progress: a bar over the reference's texts (it embeds one text at a time, the slow
            part on a real set) and one over the artifacts, on stderr.

    Returns:
        The retrieval section.

    Raises:
        InputError: a max_length above the bundle's.
    """
    from qwen3emb.validate.reference import reference_query

    start = time.perf_counter()
    manifest, ref = suite.manifest, suite.reference
    limit = request.max_length or min(EVAL_MAX_LENGTH, manifest.max_length)
    if limit > manifest.max_length:
        raise InputError(f"eval max length {limit} exceeds the bundle's max_length "
                         f"{manifest.max_length}", hint=f"Choose at most {manifest.max_length}")
    task = request.task or DEFAULT_TASK
    docs, queries = list(eval_set.doc_texts), list(eval_set.query_texts)
    logger.info("eval set: %d queries, %d documents, max length %d", len(queries), len(docs),
                limit)
    texts = docs + [reference_query(task, q) for q in queries]
    embedded = []
    with bar(len(texts), "reference", progress, unit="text") as ticker:
        for first in range(0, len(texts), 64):
            embedded.append(ref.embed(texts[first:first + 64], limit))
            ticker.update(len(embedded[-1]))
    ref_all = np.concatenate(embedded)
    ref_docs, ref_queries = ref_all[:len(docs)], ref_all[len(docs):]
    reference: dict[int, tuple[dict[str, float], np.ndarray]] = {}

    def reference_at(width: int) -> tuple[dict[str, float], np.ndarray]:
        if width not in reference:
            q, d = _cut(ref_queries, width), _cut(ref_docs, width)
            top_i, top_s = rank(q, d, eval_set)
            reference[width] = (score_run(top_i, top_s, eval_set), top_i)
        return reference[width]

    rows = [RetrievalRow(artifact=entry["path"], kind=kind, precision=precision)
            for kind, precision, entry in suite.artifacts(precisions)]
    with bar(len(rows), "eval set", progress, unit="artifact") as ticker:
        for row in rows:
            _score_artifact(suite, row, eval_set, request, limit, reference_at)
            ticker.update(1)
    width = int(manifest.embedding["output_dim"])
    ref_scores = reference_at(width)[0]
    return RetrievalReport(
        eval_set=str(Path(eval_set.path)), split=eval_set.split, queries=len(queries),
        documents=len(docs), judgments=eval_set.judgments, max_length=limit, task=task,
        reference={"dimensions": width, "precision": suite.precision, **ref_scores},
        rows=rows, max_drop=request.max_drop,
        skipped_documents=len(eval_set.skipped_documents),
        library=f"{LIBRARY} {getattr(_ir_measures(), '__version__', '?')}",
        seconds=time.perf_counter() - start)


def _score_artifact(suite: Any, row: RetrievalRow, eval_set: EvalSet, request: EvalRequest,
                    limit: int, reference_at: Any) -> None:
    """Embed the set with one artifact and fill ``row``; a failure is recorded, not raised."""
    from qwen3emb.validate.runners import open_runner

    try:
        runner, width = open_runner(suite.bundle, row.kind, row.precision, limit,
                                    suite.providers, suite.manifest)
        try:
            q_out = runner.encode_queries(list(eval_set.query_texts), task=request.task)
            d_out = runner.encode_documents(list(eval_set.doc_texts))
        finally:
            getattr(runner, "close", lambda: None)()
        ref_scores, ref_top = reference_at(width)
        top_i, top_s = rank(q_out, d_out, eval_set)
        scores = score_run(top_i, top_s, eval_set)
        row.dimensions = width
        row.record(scores, ref_scores, overlap_at_k(top_i, ref_top))
    except Qwen3EmbError as e:
        row.error = e.one_line()
    logger.info("%s: nDCG@10 %s (reference %s)", row.artifact, row.ndcg_at_10,
                row.reference_ndcg_at_10)


def _cut(vectors: np.ndarray, width: int) -> np.ndarray:
    """The first ``width`` dims, L2-normalized again (Matryoshka)."""
    if width >= vectors.shape[1]:
        return vectors
    out = vectors[:, :width]
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
