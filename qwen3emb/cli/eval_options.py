"""``validate --eval-set``: the options that score a BEIR retrieval set, and their summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

EvalSetOpt = Annotated[Path | None, typer.Option(
    "--eval-set", help="BEIR-format directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): "
    "report nDCG@10 and recall@10 of the reference and of every artifact (text bundles; "
    "needs the 'eval' extra; see docs/eval-set.md).")]
EvalSplitOpt = Annotated[str, typer.Option(
    "--eval-split", help="Which qrels/<split>.tsv of the eval set.")]
EvalTaskOpt = Annotated[str | None, typer.Option(
    "--eval-task", help="Task of the query instruction (default: the web-search task).")]
EvalMaxLengthOpt = Annotated[int | None, typer.Option(
    "--eval-max-length", help="Truncation of eval queries and documents in tokens "
    "(default: min(512, the bundle's max_length)).")]
EvalCandidatesOpt = Annotated[Path | None, typer.Option(
    "--candidates", help="Reranker bundles: a first stage's TREC run file (qid Q0 docid rank "
    "score tag) whose candidates per query are reranked (default: the whole corpus of a "
    "small set).")]
EvalDepthOpt = Annotated[int, typer.Option(
    "--candidates-depth", help="Reranker bundles: how many of each query's best candidates "
    "are reranked.")]
EvalMaxDropOpt = Annotated[float | None, typer.Option(
    "--eval-max-drop", help="Gate: fail an artifact whose nDCG@10 is more than this below the "
    "reference's (absolute, e.g. 0.01). Default: reported, not gated.")]


def eval_request(path: Path | None, split: str, task: str | None, max_length: int | None,
                 max_drop: float | None, candidates: Path | None = None, depth: int = 100
                 ) -> Any:
    """The :class:`~qwen3emb.validate.retrieval.EvalRequest` of the options, or None.

    Raises:
        InputError: an option out of range (see ``EvalRequest``).
    """
    if path is None:
        if candidates is not None:
            from qwen3emb.errors import InputError

            raise InputError("--candidates needs --eval-set (the queries, corpus and qrels "
                             "it is judged on)", hint="Add --eval-set DIR")
        return None
    from qwen3emb.validate.retrieval import EvalRequest

    return EvalRequest(path, split=split, task=task, max_length=max_length, max_drop=max_drop,
                       candidates=candidates, candidates_depth=depth)


def print_retrieval_summary(report: Any) -> None:
    """Two lines per eval set: the reference's scores, then one line per artifact."""
    section = report.retrieval
    if section is None:
        return
    ref = section.reference
    typer.echo(f"  retrieval on {section.eval_set} ({section.split}: {section.queries} queries, "
               f"{section.documents} documents): reference nDCG@10 {ref['ndcg_at_10']:.4f}, "
               f"recall@10 {ref['recall_at_10']:.4f}")
    if first := ref.get("first_stage"):
        typer.echo(f"  first stage ({section.candidates}): nDCG@10 {first['ndcg_at_10']:.4f}, "
                   f"recall@10 {first['recall_at_10']:.4f}")
    for row in section.rows:
        if row.error:
            typer.echo(f"  {row.artifact:<28} {row.precision:<5} retrieval error: {row.error}")
            continue
        failures = row.failures(section.max_drop)
        verdict = ("FAIL" if failures else "pass") if section.gated else "reported, not gated"
        typer.echo(f"  {row.artifact:<28} {row.precision:<5} nDCG@10 {row.ndcg_at_10:.4f} "
                   f"recall@10 {row.recall_at_10:.4f}  {verdict}")
        for failure in failures:
            typer.echo(f"      {failure}")
