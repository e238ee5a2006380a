"""validate --eval-set on a reranker bundle: each query's candidates (a TREC run file, or the
whole corpus of a small set) reranked by the reference and every artifact; nDCG@10 / recall@10
beside the reference's and the first stage's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen3emb.cli import create_app
from qwen3emb.errors import InputError
from qwen3emb.validate import EvalRequest, validate_bundle
from qwen3emb.validate.eval_set import load_eval_set, write_tiny_eval_set

app = create_app()
ir_measures = pytest.importorskip("ir_measures")


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_eval_set(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="module")
def run_file(eval_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A first stage's run: 6 candidates per query, the relevant documents of some queries
    missing, so reranking cannot find them."""
    eval_set = load_eval_set(eval_dir)
    rng = np.random.default_rng(0)
    lines = []
    for qid in eval_set.query_ids:
        picked = rng.choice(len(eval_set.doc_ids), size=6, replace=False)
        lines += [f"{qid} Q0 {eval_set.doc_ids[i]} {rank} {10.0 - rank} bm25"
                  for rank, i in enumerate(picked, 1)]
    path = tmp_path_factory.mktemp("run") / "first.run"
    path.write_text("\n".join(lines) + "\n")
    return path


def _ndcg_recall(qrels: dict, run: dict[str, dict[str, float]]) -> tuple[float, float]:
    ndcg, recall = ir_measures.nDCG @ 10, ir_measures.R @ 10
    qrel_rows = [ir_measures.Qrel(q, d, r) for q, docs in qrels.items() for d, r in docs.items()]
    run_rows = [ir_measures.ScoredDoc(q, d, s) for q, docs in run.items() for d, s in docs.items()]
    values = ir_measures.calc_aggregate([ndcg, recall], qrel_rows, run_rows)
    return values[ndcg], values[recall]


def test_whole_corpus_reranked_by_reference_and_artifacts(
        reranker_bundles: dict[str, Path], reranker_checkpoints: dict[str, Path],
        eval_dir: Path) -> None:
    from qwen3emb.validate.rerank import ReferenceReranker

    bundle, checkpoint = reranker_bundles["untied"], reranker_checkpoints["untied"]
    report = validate_bundle(bundle, checkpoint, precisions=["fp32"],
                             eval_set=EvalRequest(eval_dir, max_length=256))
    section = report.retrieval
    eval_set = load_eval_set(eval_dir)
    assert section.candidates == "the whole corpus"
    assert section.reference["pairs"] == len(eval_set.query_ids) * len(eval_set.doc_ids)
    # The reference's metrics, recomputed here from the card's scores of every pair.
    ref = ReferenceReranker(checkpoint, 256)
    run = {q: dict(zip(eval_set.doc_ids, map(float, ref.scores(text, eval_set.doc_texts)[0])))
           for q, text in zip(eval_set.query_ids, eval_set.query_texts)}
    ndcg, recall = _ndcg_recall(eval_set.qrels, run)
    assert section.reference["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-9)
    assert section.reference["recall_at_10"] == pytest.approx(recall, abs=1e-9)
    (row,) = section.rows
    assert row.error is None and row.precision == "fp32"
    assert abs(row.ndcg_drop) <= 1e-3 and row.overlap_at_10 >= 0.9
    assert report.passed


def test_run_file_candidates_and_the_first_stage(
        reranker_bundles: dict[str, Path], reranker_checkpoints: dict[str, Path],
        eval_dir: Path, run_file: Path, tmp_path: Path) -> None:
    bundle, checkpoint = reranker_bundles["tied"], reranker_checkpoints["tied"]
    result = CliRunner().invoke(app, [
        "validate", str(bundle), "-r", str(checkpoint), "--eval-set", str(eval_dir),
        "--candidates", str(run_file), "--candidates-depth", "4", "--eval-max-drop", "0.05",
        "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
        "--junit", str(tmp_path / "r.xml")])
    assert result.exit_code == 0, result.output
    assert "first stage (" in result.output
    data = json.loads((tmp_path / "r.json").read_text())["retrieval"]
    eval_set = load_eval_set(eval_dir)
    assert data["reference"]["pairs"] == 4 * len(eval_set.query_ids)
    assert data["gated"] and data["passed"]
    # The first stage's metrics: the run file's own top 4, scored here.
    run: dict[str, dict[str, float]] = {}
    for line in run_file.read_text().splitlines():
        qid, _, did, rank, score, _ = line.split()
        if int(rank) <= 4:
            run.setdefault(qid, {})[did] = float(score)
    ndcg, recall = _ndcg_recall(eval_set.qrels, run)
    assert data["reference"]["first_stage"]["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-9)
    # Reranking reorders the same candidates: the recall of a top 10 over 4 cannot change.
    assert data["reference"]["recall_at_10"] == pytest.approx(recall, abs=1e-9)
    assert {r["precision"] for r in data["rows"]} == {"fp32", "fp16"}
    markdown = (tmp_path / "r.md").read_text()
    assert "### Retrieval quality" in markdown and "first stage (the run's own order)" in markdown
    assert "::retrieval" in (tmp_path / "r.xml").read_text()


@pytest.mark.parametrize(("content", "expected"), [
    ("q1 Q0 d01 1\n", "line 1 has 4 fields, not 6"),
    ("q1 Q0 d01 first 2.0 run\n", "rank 'first' or score '2.0' is not a number"),
    ("nobody Q0 d01 1 2.0 run\n", "has no candidate for any judged query"),
])
def test_bad_run_files_exit_2_in_one_line(reranker_bundles: dict[str, Path],
                                          reranker_checkpoints: dict[str, Path], eval_dir: Path,
                                          tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.run"
    path.write_text(content)
    result = CliRunner().invoke(app, [
        "validate", str(reranker_bundles["untied"]), "-r", str(reranker_checkpoints["untied"]),
        "--eval-set", str(eval_dir), "--candidates", str(path), "--precision", "fp32"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line


def test_candidates_need_a_reranker_and_an_eval_set(tiny_bundle: Path, tiny_checkpoint: Path,
                                                    eval_dir: Path, run_file: Path) -> None:
    with pytest.raises(InputError, match="this bundle is an embedder"):
        validate_bundle(tiny_bundle, tiny_checkpoint,
                        eval_set=EvalRequest(eval_dir, candidates=run_file))
    result = CliRunner().invoke(app, ["validate", str(tiny_bundle), "-r", str(tiny_checkpoint),
                                      "--candidates", str(run_file)])
    assert result.exit_code == 2 and "--candidates needs --eval-set" in result.stderr
    with pytest.raises(InputError, match="candidates depth 0 is below 1"):
        EvalRequest(eval_dir, candidates_depth=0)


def test_a_corpus_too_large_to_rerank_whole_needs_a_run(
        reranker_bundles: dict[str, Path], reranker_checkpoints: dict[str, Path],
        eval_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3emb.validate import rerank_retrieval

    monkeypatch.setattr(rerank_retrieval, "MAX_CORPUS_PAIRS", 10)
    with pytest.raises(InputError, match="160 pairs .* over 10"):
        validate_bundle(reranker_bundles["untied"], reranker_checkpoints["untied"],
                        precisions=["fp32"], eval_set=eval_dir)
