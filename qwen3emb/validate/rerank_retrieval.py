"""Retrieval quality of a reranker bundle on a BEIR set: each query's candidates (the documents
a first stage retrieved, read from a TREC run file, or the whole corpus of a small set) reranked
by the reference and by every artifact, nDCG@10 / recall@10 of each beside the reference's.

The metrics, the report section and the gate are the embedders' (:mod:`.retrieval`); the
first stage's own scores are reported beside them, so the gain of reranking is visible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import RERANK_INSTRUCTION
from qwen3emb.errors import InputError, Qwen3EmbError
from qwen3emb.progress import bar
from qwen3emb.validate.eval_set import EvalSet
from qwen3emb.validate.retrieval import (
    EVAL_MAX_LENGTH,
    LIBRARY,
    EvalRequest,
    RetrievalReport,
    RetrievalRow,
    _ir_measures,
    score_run,
)

logger = logging.getLogger(__name__)

MAX_CORPUS_PAIRS = 20_000
"""Without a run file every (query, document) pair is scored; above this many, a run file is
required (the reference scores pairs one model call at a time)."""

RUN_HINT = ("A TREC run file has one line per candidate: query-id Q0 doc-id rank score tag "
            "(trec_eval's format; BEIR and pyserini write it)")


def read_run(path: str | Path, eval_set: EvalSet, depth: int) -> dict[str, list[int]]:
    """The ``depth`` best candidates per judged query of a TREC run file, as corpus indices.

    Candidates are ordered by the run's score (descending; ties by rank); documents the corpus
    lacks and a query's own id are dropped (BEIR's ``ignore_identical_ids``).

    Raises:
        InputError: a missing file, or a line that is not ``qid Q0 docid rank score [tag]``.
    """
    source = Path(path)
    if not source.is_file():
        raise InputError(f"candidates file '{source}' does not exist", hint=RUN_HINT)
    position = {d: i for i, d in enumerate(eval_set.doc_ids)}
    judged = set(eval_set.query_ids)
    found: dict[str, list[tuple[float, int, int]]] = {}
    unknown = 0
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read candidates file '{source}': {e}", hint=RUN_HINT) from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) not in (5, 6):
            raise InputError(f"'{source}' line {number} has {len(parts)} fields, not 6",
                             hint=RUN_HINT)
        qid, _, did, rank, score = parts[:5]
        try:
            key = (-float(score), int(rank))
        except ValueError:
            raise InputError(f"'{source}' line {number}: rank {rank!r} or score {score!r} is "
                             "not a number", hint=RUN_HINT) from None
        if qid not in judged:
            continue
        if did not in position:
            unknown += 1
            continue
        if did != qid:
            found.setdefault(qid, []).append((*key, position[did]))
    if unknown:
        logger.warning("candidates: %d lines name documents the corpus lacks; skipped", unknown)
    if not found:
        raise InputError(f"'{source}' has no candidate for any judged query of the eval set",
                         hint="Check that its query and document ids are the eval set's")
    if missing := [q for q in eval_set.query_ids if q not in found]:
        logger.warning("candidates: %d judged queries have none (first: %s); the metrics "
                       "leave them out, as trec_eval does", len(missing), missing[0])
    out = {}
    for qid, rows in found.items():
        seen: set[int] = set()
        ordered = [i for *_, i in sorted(rows) if not (i in seen or seen.add(i))]
        out[qid] = ordered[:depth]
    return out


def corpus_candidates(eval_set: EvalSet) -> dict[str, list[int]]:
    """Every document for every query (a query's own id excluded).

    Raises:
        InputError: more than :data:`MAX_CORPUS_PAIRS` pairs.
    """
    pairs = len(eval_set.query_ids) * len(eval_set.doc_ids)
    if pairs > MAX_CORPUS_PAIRS:
        raise InputError(f"reranking the whole corpus means {pairs} pairs (queries × "
                         f"documents), over {MAX_CORPUS_PAIRS}",
                         hint="Give the first stage's run with --candidates FILE")
    return {q: [i for i, d in enumerate(eval_set.doc_ids) if d != q] for q in eval_set.query_ids}


def candidates_for(request: EvalRequest, eval_set: EvalSet) -> tuple[dict[str, list[int]], str]:
    """The candidates of each judged query and where they came from (the run file, or the
    whole corpus); cheap, so the validator calls it before loading any model.

    Raises:
        InputError: see :func:`read_run` and :func:`corpus_candidates`.
    """
    if request.candidates is not None:
        return (read_run(request.candidates, eval_set, request.candidates_depth),
                str(request.candidates))
    return corpus_candidates(eval_set), "the whole corpus"


def _ranked(candidates: dict[str, list[int]], scores: dict[str, np.ndarray],
            eval_set: EvalSet) -> tuple[list[list[int]], list[list[float]]]:
    """Per judged query, its candidates by score (best first, ties in candidate order)."""
    top_i, top_s = [], []
    for qid in eval_set.query_ids:
        idx = candidates.get(qid, [])
        sc = scores.get(qid, np.empty(0))
        order = np.argsort(-np.asarray(sc, dtype=np.float64), kind="stable")
        top_i.append([idx[j] for j in order])
        top_s.append([float(sc[j]) for j in order])
    return top_i, top_s


def _pad(rows: list[list[Any]], fill: Any) -> np.ndarray:
    width = max([len(r) for r in rows] + [1])
    return np.array([r + [fill] * (width - len(r)) for r in rows])


def runner_scores(runner: Any, instruction: str) -> Any:
    """``(query, documents) -> scores`` of one artifact's runtime."""
    return lambda query, documents: runner.score(query, documents, instruction)


def _overlap(mine: list[list[int]], theirs: list[list[int]], k: int = 10) -> float:
    """Mean share of the reference's top k (or all its candidates, if fewer) in ``mine``'s."""
    shares = [len(set(a[:k]) & set(b[:k])) / min(k, len(b)) for a, b in zip(mine, theirs) if b]
    return float(np.mean(shares)) if shares else 1.0


def _metrics(top_i: list[list[int]], top_s: list[list[float]], eval_set: EvalSet
             ) -> dict[str, float]:
    return score_run(_pad(top_i, 0), _pad(top_s, -np.inf), eval_set)


def evaluate_reranker_bundle(suite: Any, eval_set: EvalSet, request: EvalRequest,
                             precisions: Sequence[str] | None = None, progress: bool = False
                             ) -> RetrievalReport:
    """Rerank each query's candidates with the reference and every artifact of ``suite``.

    Args:
        suite: the :class:`~qwen3emb.validate.rerank.RerankSuite` (its bundle and reference).
        eval_set: the loaded set.
        request: split, instruction (``task``), truncation, gate, and ``candidates`` /
            ``candidates_depth``.
        precisions: only these artifacts (default: all).
        progress: bars over the reference's queries and the artifacts, on stderr.

    Raises:
        InputError: a max_length above the bundle's, a bad run file, or the whole corpus of a
            set too large to score without one.
    """
    from qwen3emb.validate.rerank import ReferenceReranker

    start = time.perf_counter()
    manifest = suite.manifest
    limit = request.max_length or min(EVAL_MAX_LENGTH, manifest.max_length)
    if limit > manifest.max_length:
        raise InputError(f"eval max length {limit} exceeds the bundle's max_length "
                         f"{manifest.max_length}", hint=f"Choose at most {manifest.max_length}")
    instruction = request.task or RERANK_INSTRUCTION
    candidates, source = candidates_for(request, eval_set)
    texts = {q: t for q, t in zip(eval_set.query_ids, eval_set.query_texts)}
    pairs = sum(len(v) for v in candidates.values())
    logger.info("rerank eval: %d queries, %d pairs from %s, max length %d", len(candidates),
                pairs, source, limit)

    def score_all(score: Any, label: str) -> dict[str, np.ndarray]:
        out = {}
        with bar(len(candidates), label, progress, unit="query") as ticker:
            for qid, idx in candidates.items():
                out[qid] = np.asarray(score(texts[qid], [eval_set.doc_texts[i] for i in idx]),
                                      dtype=np.float64)
                ticker.update(1)
        return out

    ref = ReferenceReranker(suite.checkpoint.path, limit)
    ref_scores = score_all(lambda q, d: ref.scores(q, d, instruction)[0], "reference")
    ref_top, ref_s = _ranked(candidates, ref_scores, eval_set)
    reference = {"precision": ref.precision, "dimensions": "n/a",
                 **_metrics(ref_top, ref_s, eval_set)}
    reference["candidates"] = source
    reference["pairs"] = pairs
    if request.candidates is not None:
        # The first stage's own ranking of the same candidates.
        first = {q: -np.arange(len(v), dtype=np.float64) for q, v in candidates.items()}
        first_i, first_s = _ranked(candidates, first, eval_set)
        reference["first_stage"] = _metrics(first_i, first_s, eval_set)
    rows = []
    models = [(k, p, e) for k, p, e in suite._models() if not precisions or p in precisions]
    with bar(len(models), "eval set", progress, unit="artifact") as ticker:
        for kind, precision, entry in models:
            row = RetrievalRow(artifact=entry["path"], kind=kind, precision=precision)
            try:
                runner = suite.open(kind, precision, None, limit)
                try:
                    got = score_all(runner_scores(runner, instruction), entry["path"])
                finally:
                    getattr(runner, "close", lambda: None)()
                top_i, top_s = _ranked(candidates, got, eval_set)
                row.record(_metrics(top_i, top_s, eval_set), reference,
                           _overlap(top_i, ref_top))
            except Qwen3EmbError as e:
                row.error = e.one_line()
            logger.info("%s: nDCG@10 %s (reference %s)", row.artifact, row.ndcg_at_10,
                        reference["ndcg_at_10"])
            rows.append(row)
            ticker.update(1)
    return RetrievalReport(
        eval_set=str(Path(eval_set.path)), split=eval_set.split, queries=len(eval_set.query_ids),
        documents=len(eval_set.doc_ids), judgments=eval_set.judgments, max_length=limit,
        task=instruction, reference=reference, rows=rows, max_drop=request.max_drop,
        skipped_documents=len(eval_set.skipped_documents),
        library=f"{LIBRARY} {getattr(_ir_measures(), '__version__', '?')}",
        seconds=time.perf_counter() - start, candidates=source)
