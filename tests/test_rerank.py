"""Qwen3-Reranker bundles: task choice, the score graph, the torch-free Reranker, the validator
against the model card's recipe, and the rerank command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen3emb.cli import create_app

runner = CliRunner()
app = create_app()

QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital and largest city of France.", "Bananas are yellow.",
             "東京は日本の首都です。", "def add(a, b):\n    return a + b", ""]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_task_comes_from_the_flag_or_else_the_name() -> None:
    from qwen3emb.convert.qwen3_reranker import task_for
    from qwen3emb.errors import InputError

    assert task_for("Qwen/Qwen3-Reranker-0.6B", None) == ("rerank", "name")
    assert task_for("/models/my-RERANKER/", None) == ("rerank", "name")
    assert task_for("Qwen/Qwen3-Embedding-0.6B", None) == ("embed", "name")
    assert task_for("Qwen/Qwen3-Reranker-0.6B", "embed") == ("embed", "flag")
    with pytest.raises(InputError, match="unknown task 'score'"):
        task_for("x", "score")


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_every_precision_matches_the_model_card_scores(reranker_bundles: dict[str, Path],
                                                       name: str) -> None:
    from qwen3emb.constants import SCORE_FLOORS

    bundle = reranker_bundles[name]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"] == "rerank" and manifest["task_source"] == "name"
    parity = manifest["parity"]
    assert parity["status"] == "passed"
    assert set(parity["max_abs_score_diff"]) == {"fp32", "fp16"}
    for precision, diff in parity["max_abs_score_diff"].items():
        assert diff <= SCORE_FLOORS[precision]
    assert parity["max_abs_score_diff"]["fp32"] < 1e-5
    report = json.loads((bundle / "reports" / "parity.json").read_text())
    for artifact in report["artifacts"]:
        assert artifact["batch_vs_single_max_diff"] <= 1e-6
        assert artifact["min_kendall_tau"] > 0.9 and artifact["top1_agreement"] == 1.0
    assert "max abs score diff" in (bundle / "reports" / "parity.md").read_text()


def test_the_score_head_is_yes_minus_no_and_the_graph_has_no_vocabulary_head(
        reranker_bundles: dict[str, Path], reranker_checkpoints: dict[str, Path]) -> None:
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    for name, tied_to in (("untied", "lm_head.weight"), ("tied", "model.embed_tokens.weight")):
        checkpoint = reranker_checkpoints[name]
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert ("lm_head.weight" in weights) == (name == "untied")
        tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
        head = weights[tied_to].astype(np.float32)
        model = onnx.load(str(reranker_bundles[name] / "onnx" / "model.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        np.testing.assert_array_equal(inits["score_head"].ravel(), head[yes] - head[no])
        vocab = head.shape[0]
        assert sum(a.ndim == 2 and vocab in a.shape for a in inits.values()) == 1  # the table
        assert [o.name for o in model.graph.output] == ["score", "logits"]


def test_scores_do_not_depend_on_padding_side_or_batch(reranker_bundles: dict[str, Path]) -> None:
    from qwen3emb.runtime import Reranker

    reranker = Reranker(reranker_bundles["untied"])
    ids, _ = reranker.prompt.pair_ids(QUERY, DOCUMENTS)
    width = max(len(r) for r in ids)
    rows = {}
    for side in ("left", "right"):
        input_ids = np.full((len(ids), width), reranker.pad_id, dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for i, row in enumerate(ids):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            input_ids[i, span], mask[i, span] = row, 1
        rows[side] = reranker.run_ids(input_ids, mask)
    singles = np.array([reranker.score(QUERY, [d])[0] for d in DOCUMENTS])
    np.testing.assert_allclose(rows["left"][0], rows["right"][0], atol=1e-6)
    np.testing.assert_allclose(rows["left"][0], singles, atol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-rows["left"][1])), rows["left"][0], atol=1e-6)
    # Several documents share the (0, 1) range: the fixture's head spreads them.
    assert np.ptp(singles) > 0.1


def test_rerank_orders_by_score_and_checks_its_inputs(reranker_bundles: dict[str, Path]) -> None:
    from qwen3emb.errors import InputError
    from qwen3emb.runtime import Reranker

    reranker = Reranker(reranker_bundles["tied"], precision="fp16")
    scores = reranker.score(QUERY, DOCUMENTS)
    assert scores.dtype == np.float32 and scores.shape == (len(DOCUMENTS),)
    ranked = reranker.rerank(QUERY, DOCUMENTS, top_n=3)
    assert [i for i, _ in ranked] == list(np.argsort(-scores, kind="stable")[:3])
    assert [s for _, s in ranked] == pytest.approx(sorted(scores, reverse=True)[:3])
    other = reranker.score(QUERY, DOCUMENTS, instruction="Find code that answers the question")
    assert np.abs(other - scores).max() > 1e-4  # the instruction is in the prompt
    assert reranker.score(QUERY, []).shape == (0,)
    for call, message in ((lambda: reranker.score(QUERY, "one string"), "single string"),
                          (lambda: reranker.score(QUERY, ["a", 3]), "document 1 is a int"),
                          (lambda: reranker.score(None, ["a"]), "query is a NoneType"),
                          (lambda: reranker.rerank(QUERY, ["a"], top_n=0), "top_n")):
        with pytest.raises(InputError, match=message):
            call()


def test_long_documents_are_cut_but_the_prompt_never_is(reranker_bundles: dict[str, Path],
                                                        reranker_checkpoints: dict[str, Path]
                                                        ) -> None:
    """The content is truncated to max_length minus prefix and suffix, exactly as the model
    card's transformers call does, keeping what the post-processor appends."""
    from qwen3emb.runtime import Reranker
    from qwen3emb.validate.rerank import ReferenceReranker

    long_doc = " ".join(["relevance judgments for passage ranking"] * 80)
    for name in ("untied", "tied"):
        reranker = Reranker(reranker_bundles[name], max_length=160)
        ids, cut = reranker.prompt.pair_ids(QUERY, [long_doc, "short"])
        assert cut == [True, False] and len(ids[0]) == 160
        assert ids[0][-len(reranker.prompt.suffix_ids):] == reranker.prompt.suffix_ids
        assert ids[0][:len(reranker.prompt.prefix_ids)] == reranker.prompt.prefix_ids
        reference = ReferenceReranker(reranker_checkpoints[name], 160)
        ref_scores, _ = reference.scores(QUERY, [long_doc, "short"])
        np.testing.assert_allclose(reranker.score(QUERY, [long_doc, "short"]), ref_scores,
                                   atol=1e-5)


def test_embedders_and_rerankers_refuse_each_others_bundles(
        reranker_bundles: dict[str, Path], tiny_bundle: Path) -> None:
    from qwen3emb.errors import BundleError
    from qwen3emb.runtime import Reranker, TextEmbedder

    with pytest.raises(BundleError, match="not embeddings"):
        TextEmbedder(reranker_bundles["untied"])
    with pytest.raises(BundleError, match="not a reranker"):
        Reranker(tiny_bundle)


def test_reranker_runtime_imports_without_torch(reranker_bundles: dict[str, Path],
                                                run_without_torch) -> None:
    result = run_without_torch(f"""
        from qwen3emb.runtime import Reranker
        print(Reranker({str(reranker_bundles["untied"])!r}).rerank("q", ["a", "b"]))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[(")


def test_rerank_command_prints_json_lines_best_first(reranker_bundles: dict[str, Path],
                                                     tmp_path: Path) -> None:
    from qwen3emb.runtime import Reranker

    extra = tmp_path / "docs.jsonl"
    extra.write_text('"from a file"\n{"text": "an object"}\n', encoding="utf-8")
    bundle = reranker_bundles["untied"]
    result = invoke("rerank", bundle, QUERY, *DOCUMENTS[:2], "--documents", extra)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    everything = [*DOCUMENTS[:2], "from a file", "an object"]
    assert sorted(line["index"] for line in lines) == [0, 1, 2, 3]
    assert [line["document"] for line in lines] == [everything[line["index"]] for line in lines]
    expected = Reranker(bundle).score(QUERY, everything)
    assert [line["score"] for line in lines] == pytest.approx(
        sorted(expected.tolist(), reverse=True), abs=1e-6)
    top = invoke("rerank", bundle, QUERY, *DOCUMENTS, "--top-n", "2")
    assert len(top.stdout.splitlines()) == 2
    none = invoke("rerank", bundle, QUERY)
    assert none.exit_code == 2 and none.stderr.strip().startswith("error: no documents")


def test_inspect_and_validate_read_reranker_bundles(reranker_bundles: dict[str, Path],
                                                    reranker_checkpoints: dict[str, Path],
                                                    tmp_path: Path) -> None:
    bundle = reranker_bundles["tied"]
    shown = invoke("inspect", bundle)
    assert shown.exit_code == 0 and "reranker" in shown.stdout and "max_abs" not in shown.stdout
    junit = tmp_path / "parity.xml"
    result = invoke("validate", bundle, "-r", reranker_checkpoints["tied"], "--precision", "fp32",
                    "--junit", junit)
    assert result.exit_code == 0, result.output
    assert "max |score diff|" in result.stdout
    assert 'failures="0"' in junit.read_text()


@pytest.mark.parametrize("args, message", [
    (("--precision", "int8", "--target", "int8=0.999"), "Drop --target for rerankers"),
    (("--dimensions", "32"), "a reranker outputs one score"),
])
def test_reranker_exports_refuse_what_they_cannot_hold_in_one_line(
        reranker_checkpoints: dict[str, Path], tmp_path: Path, args: tuple[str, ...],
        message: str) -> None:
    out = tmp_path / "out"
    result = invoke("export", reranker_checkpoints["untied"], "-o", out, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_a_tokenizer_without_yes_and_no_tokens_is_refused(tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    result = invoke("export", tiny_checkpoint, "-o", tmp_path / "out", "--task", "rerank",
                    "--no-validate")
    assert result.exit_code == 2
    assert "no single token 'yes'" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_int8_and_int4_are_searched_on_the_score_and_hold_their_floors(
        reranker_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The search scores each build on |score diff| over reranker-prompt calibration pairs,
    not on cosine; the validator's probes (other texts) then confirm the floors."""
    from qwen3emb.constants import SCORE_FLOORS
    from qwen3emb.pipeline import export_bundle

    result = export_bundle(reranker_checkpoints["untied"], tmp_path / "b", task="rerank",
                           precisions=["int8", "int4"])
    assert result.passed
    diffs = result.manifest["parity"]["max_abs_score_diff"]
    for precision in ("int8", "int4"):
        assert diffs[precision] <= SCORE_FLOORS[precision]
        entry = next(a for a in result.manifest["artifacts"]
                     if a.get("role") == "model" and a["precision"] == precision)
        settings = entry["settings"]
        assert settings["metric"] == "score" and settings["target_reached"]
        assert settings["calibration_fidelity"] <= settings["target"] < SCORE_FLOORS[precision]
        assert all("calibration_max_score_diff" in r for r in settings["rounds"])
        assert "table_alone" in settings["embedding"]
    import onnx

    graph = onnx.load(str(tmp_path / "b" / "onnx" / "model_int8.onnx"))
    head = next(n for n in graph.graph.node if "score_head" in n.input)
    assert head.op_type == "MatMul"  # the one-column head stays fp32 in every variant


@pytest.mark.slow
def test_a_table_that_moves_the_score_stays_fp32(tmp_path: Path) -> None:
    """Massive activations: the 8-bit embedding table alone moves the score past half the
    int8 target, so the search keeps the table fp32 (size, not time) and escalates MatMuls
    until the floor holds; what it cost is in the settings."""
    from qwen3emb.constants import SCORE_FLOORS
    from qwen3emb.convert.hard_checkpoints import build_hard_checkpoint
    from qwen3emb.pipeline import export_bundle

    checkpoint = build_hard_checkpoint(tmp_path / "massive-reranker", "massive-activations",
                                       reranker=True, seed=5)
    result = export_bundle(checkpoint, tmp_path / "b", precisions=["int8"])
    assert result.manifest["task"] == "rerank" and result.passed
    assert result.manifest["parity"]["max_abs_score_diff"]["int8"] <= SCORE_FLOORS["int8"]
    entry = next(a for a in result.manifest["artifacts"]
                 if a.get("role") == "model" and a["precision"] == "int8")
    embedding = entry["settings"]["embedding"]
    assert embedding["table_fp32"] and embedding["table_alone"] > SCORE_FLOORS["int8"] / 4
    assert embedding["treatment"].startswith("fp32")
    assert "fp32 embedding table" in entry["scheme"]


def test_the_readme_two_stage_example_runs_without_torch(reranker_bundles: dict[str, Path],
                                                        tiny_bundle: Path,
                                                        run_without_torch) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Rerank (second stage)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"qwen3-0.6b"', repr(str(tiny_bundle)))
    code = code.replace('"reranker-0.6b"', repr(str(reranker_bundles["untied"])))
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(0.0 < float(line.rsplit(" ", 1)[1]) < 1.0 for line in lines)
