"""validate --eval-set: BEIR sets read strictly, nDCG@10 / recall@10 per artifact beside the
reference's, in every report format, with one-line errors for malformed sets."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen3emb.cli import create_app
from qwen3emb.errors import InputError, MissingDependencyError
from qwen3emb.validate import EvalRequest, validate_bundle
from qwen3emb.validate.compare import ArtifactResult, ParityReport
from qwen3emb.validate.eval_set import load_eval_set, write_tiny_eval_set
from qwen3emb.validate.report import to_junit, to_markdown, write_report
from qwen3emb.validate.retrieval import RetrievalReport, RetrievalRow, rank, score_run

app = create_app()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_eval_set(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="module")
def mixed_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 + int8 ONNX and a q8_0 GGUF of the tiny checkpoint: one artifact of each kind."""
    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    from qwen3emb.pipeline import export_bundle

    out = tmp_path_factory.mktemp("evalset-bundle") / "mixed"
    return export_bundle(tiny_checkpoint, out, validate=False, precisions=["int8"],
                         formats=["onnx", "gguf"], gguf_types=["q8_0"]).bundle


@pytest.fixture(scope="module")
def mixed_report(mixed_bundle: Path, tiny_checkpoint: Path, eval_dir: Path) -> ParityReport:
    return validate_bundle(mixed_bundle, tiny_checkpoint, eval_set=eval_dir)


# --- the set ---------------------------------------------------------------------------------

def test_tiny_set_is_beir_format_with_two_splits(eval_dir: Path) -> None:
    rows = [json.loads(line) for line in (eval_dir / "corpus.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(set(r) == {"_id", "title", "text"} for r in rows)
    assert (eval_dir / "qrels" / "test.tsv").read_text().startswith(
        "query-id\tcorpus-id\tscore\n")
    test = load_eval_set(eval_dir)
    assert test.split == "test" and len(test.query_ids) == 8 and len(test.doc_ids) == 20
    assert test.judgments == 14 and test.qrels["q5"]["d00"] == 2 and test.qrels["q4"]["d11"] == 0
    # Documents are title + " " + text, without any instruction.
    assert test.doc_texts[3].startswith("France What is the capital of France?")
    assert not any(t.startswith("Instruct:") for t in test.doc_texts[:6])
    dev = load_eval_set(eval_dir, "dev")
    assert dev.query_ids == ("q1", "q5", "q7")


# --- the metrics -----------------------------------------------------------------------------

def _hand_scores(ranking: list[list[int]], eval_set) -> tuple[float, float]:
    """trec_eval's nDCG@10 (linear gains) and recall@10, written out independently."""
    ndcgs, recalls = [], []
    for qid, ranked in zip(eval_set.query_ids, ranking):
        rel = {eval_set.doc_ids.index(d): r for d, r in eval_set.qrels[qid].items()}
        dcg = sum(rel.get(doc, 0) / np.log2(i + 2) for i, doc in enumerate(ranked[:10]))
        ideal = sorted(rel.values(), reverse=True)[:10]
        ndcgs.append(dcg / sum(r / np.log2(i + 2) for i, r in enumerate(ideal)))
        relevant = {d for d, r in rel.items() if r > 0}
        recalls.append(len(relevant & set(ranked[:10])) / len(relevant))
    return float(np.mean(ndcgs)), float(np.mean(recalls))


def test_metrics_follow_trec_eval_definitions(eval_dir: Path) -> None:
    es = load_eval_set(eval_dir)
    rng = np.random.default_rng(0)
    scores = rng.random((len(es.query_ids), len(es.doc_ids))).astype(np.float32)
    # Documents as one-hot vectors: the query's vector is its score row.
    top_i, top_s = rank(scores, np.eye(len(es.doc_ids), dtype=np.float32), es)
    assert top_i.shape == (8, 20) and np.all(np.diff(top_s, axis=1) <= 0)
    expected = [list(np.argsort(-row)) for row in scores]
    assert [list(r) for r in top_i] == expected
    got = score_run(top_i, top_s, es)
    ndcg, recall = _hand_scores(expected, es)
    assert got["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-9)
    assert got["recall_at_10"] == pytest.approx(recall, abs=1e-9)
    # The ideal ranking scores 1.
    ideal = np.zeros_like(scores)
    for q, qid in enumerate(es.query_ids):
        for d, r in es.qrels[qid].items():
            ideal[q, es.doc_ids.index(d)] = 1 + r
    best = score_run(*rank(ideal, np.eye(20, dtype=np.float32), es), es)
    assert best == pytest.approx({"ndcg_at_10": 1.0, "recall_at_10": 1.0}, abs=1e-12)


def test_a_document_with_the_query_id_is_never_retrieved(tmp_path: Path) -> None:
    root = write_tiny_eval_set(tmp_path / "s")
    lines = (root / "corpus.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"_id": "q1", "title": "", "text": "the query itself"})
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    es = load_eval_set(root)
    # Every query's best document would be index 0, the one with id "q1".
    queries = np.tile(np.linspace(1.0, 0.1, 20, dtype=np.float32), (8, 1))
    top_i, _ = rank(queries, np.eye(20, dtype=np.float32), es, depth=5)
    assert list(top_i[0]) == [1, 2, 3, 4, 5] and list(top_i[1]) == [0, 1, 2, 3, 4]


# --- the validator ---------------------------------------------------------------------------

def test_every_artifact_is_scored_beside_the_reference(mixed_report: ParityReport) -> None:
    section = mixed_report.retrieval
    assert section is not None and not section.gated and mixed_report.passed
    assert [(r.kind, r.precision) for r in section.rows] == [
        ("onnx", "fp32"), ("onnx", "int8"), ("gguf", "q8_0")]
    assert (section.queries, section.documents, section.judgments) == (8, 20, 14)
    assert section.max_length == 512 and section.library.startswith("ir-measures ")
    ref = section.reference
    for row in section.rows:
        assert row.error is None and row.dimensions == ref["dimensions"] == 64
        for value in (row.ndcg_at_10, row.recall_at_10, row.overlap_at_10):
            assert value is not None and 0.0 <= value <= 1.0
        assert row.reference_ndcg_at_10 == ref["ndcg_at_10"]
    assert 0.0 < ref["ndcg_at_10"] <= 1.0 and 0.0 < ref["recall_at_10"] <= 1.0
    fp32 = section.rows[0]  # cosine >= 0.99999 leaves every ranking as the reference's
    assert fp32.ndcg_at_10 == pytest.approx(ref["ndcg_at_10"], abs=1e-9)
    assert fp32.recall_at_10 == pytest.approx(ref["recall_at_10"], abs=1e-9)
    assert fp32.overlap_at_10 == 1.0


def test_artifact_scores_are_those_of_the_runtime_with_the_instruction(
        mixed_bundle: Path, mixed_report: ParityReport, eval_dir: Path) -> None:
    from qwen3emb.runtime.text import TextEmbedder

    es = load_eval_set(eval_dir)
    embedder = TextEmbedder(mixed_bundle, precision="int8", max_length=512)
    queries = embedder.encode_queries(list(es.query_texts))
    docs = embedder.encode_documents(list(es.doc_texts))
    scores = score_run(*rank(queries, docs, es), es)
    int8 = mixed_report.retrieval.rows[1]
    assert (int8.ndcg_at_10, int8.recall_at_10) == (scores["ndcg_at_10"], scores["recall_at_10"])


def test_reports_carry_the_retrieval_section(mixed_report: ParityReport, tmp_path: Path) -> None:
    write_report(mixed_report, json_path=tmp_path / "r.json", markdown_path=tmp_path / "r.md",
                 junit_path=tmp_path / "r.xml")
    data = json.loads((tmp_path / "r.json").read_text())["retrieval"]
    assert data["gated"] is False and data["passed"] is True and data["split"] == "test"
    assert [r["precision"] for r in data["rows"]] == ["fp32", "int8", "q8_0"]
    assert data["rows"][0]["ndcg_drop"] == pytest.approx(0.0, abs=1e-9)
    markdown = (tmp_path / "r.md").read_text()
    assert "### Retrieval quality" in markdown and "reported, not gated" in markdown
    for name in ("| reference (float32) |", "| `onnx/model.onnx` |", "| `onnx/model_int8.onnx` |",
                 "| `gguf/model-q8_0.gguf` |"):
        assert name in markdown
    suite = ET.parse(tmp_path / "r.xml").getroot()
    cases = [c.get("name") for c in suite.iter("testcase")]
    assert sum(c.endswith("::retrieval") for c in cases) == 3
    assert suite.get("tests") == str(len(cases)) == "12" and suite.get("failures") == "0"


def test_max_drop_gates_the_report() -> None:
    rows = [RetrievalRow("onnx/model.onnx", "onnx", "fp32", 64, 0.50, 0.9, 0.50, 0.9, 1.0),
            RetrievalRow("onnx/model_int4.onnx", "onnx", "int4", 64, 0.45, 0.8, 0.50, 0.9, 0.7)]
    section = RetrievalReport(eval_set="s", split="test", queries=8, documents=20, judgments=14,
                              max_length=512, task="t", reference={"dimensions": 64,
                              "precision": "float32", "ndcg_at_10": 0.5, "recall_at_10": 0.9},
                              rows=rows)
    artifact = ArtifactResult(artifact="onnx/model.onnx", kind="onnx", precision="fp32",
                              floor=0.99999, cosines={"probe:a": 1.0})
    report = ParityReport(bundle="b", reference={"source": "r", "precision": "float32"},
                          probe_max_length=256, probe_count=1, artifacts=[artifact],
                          tool_version="0", created="now", retrieval=section)
    assert report.passed and 'failures="0"' in to_junit(report)  # not gated by default
    report.retrieval = replace(section, max_drop=0.1)
    assert report.passed
    report.retrieval = replace(section, max_drop=0.01)
    assert not report.passed
    (failure,) = rows[1].failures(0.01)
    assert failure == "nDCG@10 0.4500 is 0.0500 below the reference's 0.5000 (max drop 0.01)"
    assert 'failures="1"' in to_junit(report) and "| int4 | 64 | 0.4500 | -0.0500 |" in \
        to_markdown(report)


# --- errors ----------------------------------------------------------------------------------

def _corrupt(root: Path, name: str, line: int, text: str) -> None:
    lines = (root / name).read_text().splitlines()
    lines[line] = text
    (root / name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda r: (r / "corpus.jsonl").unlink(), "eval set has no corpus.jsonl"),
    (lambda r: _corrupt(r, "corpus.jsonl", 2, "{not json"), "corpus.jsonl' line 3 is not valid"),
    (lambda r: _corrupt(r, "corpus.jsonl", 0, '{"_id": "d00"}'), 'line 1 has no string "text"'),
    (lambda r: _corrupt(r, "queries.jsonl", 1, '{"_id": "q1", "text": "again"}'),
     "line 2 repeats the query id 'q1'"),
    (lambda r: _corrupt(r, "qrels/test.tsv", 2, "q1 d03 1"), "line 3 has 1 tab-separated"),
    (lambda r: _corrupt(r, "qrels/test.tsv", 2, "q1\td03\thigh"), "line 3 has the score 'high'"),
    (lambda r: _corrupt(r, "qrels/test.tsv", 2, "q99\td03\t1"), "judges 1 queries that"),
    (lambda r: (r / "qrels" / "test.tsv").rename(r / "qrels" / "eval.tsv"),
     "Splits in this set: dev, eval; choose one with --eval-split"),
])
def test_malformed_set_gives_one_line_error_with_the_fix(tmp_path: Path, damage, expected
                                                         ) -> None:
    root = write_tiny_eval_set(tmp_path / "bad")
    damage(root)
    with pytest.raises(InputError) as info:
        load_eval_set(root)
    line = info.value.one_line()
    assert expected in line and "\n" not in line and info.value.hint
    assert str(root) in line or "Splits" in line


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch, eval_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "ir_measures", None)
    es = load_eval_set(eval_dir)
    top = rank(np.eye(8, 20, dtype=np.float32), np.eye(20, dtype=np.float32), es)
    with pytest.raises(MissingDependencyError) as info:
        score_run(*top, es)
    assert "pip install 'qwen3emb-export[eval]'" in info.value.one_line()


def test_request_checks_its_values() -> None:
    with pytest.raises(InputError, match="outside 0..1"):
        EvalRequest("x", max_drop=1.5)
    with pytest.raises(InputError, match="below 8"):
        EvalRequest("x", max_length=4)


# --- CLI -------------------------------------------------------------------------------------

def test_cli_gated_eval_set_passes_and_writes_every_format(
        tiny_bundle: Path, tiny_checkpoint: Path, eval_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "validate", str(tiny_bundle), "-r", str(tiny_checkpoint), "--eval-set", str(eval_dir),
        "--eval-split", "dev", "--eval-max-drop", "0", "--json", str(tmp_path / "r.json"),
        "--markdown", str(tmp_path / "r.md"), "--junit", str(tmp_path / "r.xml")])
    assert result.exit_code == 0, result.output
    assert "retrieval on" in result.output and "(dev: 3 queries, 20 documents)" in result.output
    data = json.loads((tmp_path / "r.json").read_text())["retrieval"]
    assert data["gated"] is True and data["max_drop"] == 0.0 and data["queries"] == 3
    assert "an artifact fails when its nDCG@10 drops more than 0.0" in \
        (tmp_path / "r.md").read_text()
    assert "::retrieval" in (tmp_path / "r.xml").read_text()


@pytest.mark.parametrize(("args", "expected"), [
    (["--eval-split", "train"], "no qrels for split 'train'"),
    (["--eval-max-drop", "2"], "eval max drop 2.0 is outside 0..1"),
    (["--eval-max-length", "99999"], "eval max length 99999 exceeds the bundle's max_length"),
])
def test_cli_bad_eval_input_exits_2_with_one_line(tiny_bundle: Path, tiny_checkpoint: Path,
                                                  eval_dir: Path, args: list[str],
                                                  expected: str) -> None:
    result = CliRunner().invoke(app, ["validate", str(tiny_bundle), "-r", str(tiny_checkpoint),
                                      "--eval-set", str(eval_dir), *args])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line


def test_vl_bundle_is_refused_in_one_line(vl_bundle: Path, vl_checkpoint: Path,
                                          eval_dir: Path) -> None:
    with pytest.raises(InputError, match="scored on text bundles only; this bundle is "
                                         "vision-language"):
        validate_bundle(vl_bundle, vl_checkpoint, eval_set=eval_dir)
