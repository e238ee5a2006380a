"""Every command through CliRunner: exit codes, outputs, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen3emb.cli import create_app

runner = CliRunner()
app = create_app()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_no_arguments_shows_help() -> None:
    result = invoke()
    assert "export" in result.output and "validate" in result.output and "demo" in result.output


@pytest.mark.parametrize("command", ["export", "validate", "embed", "rerank", "inspect", "demo",
                                     "embed-corpus"])
def test_each_command_has_help_with_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "qwen3emb-export " + command in result.output  # the example line


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("qwen3emb-export ")


def test_export_writes_a_bundle_and_summary(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    result = invoke("export", tiny_checkpoint, "-o", out, "--no-validate", "--max-length", "128")
    assert result.exit_code == 0, result.output
    assert "onnx/model.onnx" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["max_length"] == 128
    assert manifest["parity"] == {"status": "not-run"}


def test_export_of_missing_checkpoint_exits_2_with_one_line(tmp_path: Path) -> None:
    result = invoke("export", tmp_path / "missing", "-o", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint")
    assert not (tmp_path / "out").exists()


def test_export_to_existing_directory_exits_2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    result = invoke("export", tiny_checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "already exists" in result.stderr


def test_export_non_qwen3_exits_2_naming_the_type(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "bert"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "bert"
    (ckpt / "config.json").write_text(json.dumps(config))
    result = invoke("export", ckpt, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "'bert'" in result.stderr and "Supported model types: qwen3" in result.stderr


def test_validate_passes_and_writes_reports(tiny_bundle: Path, tiny_checkpoint: Path,
                                            tmp_path: Path) -> None:
    result = invoke("validate", tiny_bundle, "--reference", tiny_checkpoint,
                    "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md",
                    "--junit", tmp_path / "r.xml")
    assert result.exit_code == 0, result.output
    assert "parity PASS" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    assert (tmp_path / "r.md").exists() and (tmp_path / "r.xml").exists()


def test_validate_with_texts_file(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    texts = tmp_path / "t.txt"
    texts.write_text("first probe\n\nsecond\\nline\n")
    result = invoke("validate", tiny_bundle, "-r", tiny_checkpoint, "--texts", texts,
                    "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    cosines = json.loads((tmp_path / "r.json").read_text())["artifacts"][0]["cosines"]
    assert "probe:user-0" in cosines and "probe:user-1" in cosines


def test_validate_exits_1_when_a_floor_fails(wrong_bundle: Path, tiny_checkpoint: Path) -> None:
    result = invoke("validate", wrong_bundle, "-r", tiny_checkpoint)
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_validate_usage_errors_exit_2(tiny_bundle: Path, tmp_path: Path) -> None:
    assert invoke("validate", tiny_bundle).exit_code == 2  # --reference missing
    result = invoke("validate", tmp_path / "nope", "-r", tmp_path)
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_embed_prints_json_lines(tiny_bundle: Path) -> None:
    result = invoke("embed", tiny_bundle, "first", "second", "--dimensions", "32")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["first", "second"]
    assert len(rows[0]["embedding"]) == 32


def test_embed_query_to_npy_matches_library(tiny_bundle: Path, tmp_path: Path) -> None:
    from qwen3emb.runtime import TextEmbedder

    out = tmp_path / "q.npy"
    result = invoke("embed", tiny_bundle, "capital of France?", "--query", "--task", "Find it",
                    "-o", out)
    assert result.exit_code == 0, result.output
    expected = TextEmbedder(tiny_bundle).encode_queries(["capital of France?"], "Find it")
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)


def test_embed_jsonl_output(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.jsonl"
    assert invoke("embed", tiny_bundle, "a", "b", "-o", out).exit_code == 0
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    ([], "no texts given"),
    (["x", "--task", "t"], "--task only applies to queries"),
    (["", "x"], "text 0 is an empty string"),
    (["x", "-o", "out.csv"], "must end in .npy or .jsonl"),
    (["x", "--dimensions", "8"], "outside this bundle's Matryoshka range"),
    (["x", "--provider", "cuda"], "execution provider 'cuda' is not available"),
])
def test_embed_bad_input_exits_2_with_one_line(tiny_bundle: Path, args: list[str],
                                               message: str) -> None:
    result = invoke("embed", tiny_bundle, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inspect_shows_contents_and_json(tiny_bundle: Path) -> None:
    result = invoke("inspect", tiny_bundle)
    assert result.exit_code == 0
    assert "onnx/model.onnx" in result.output and "ok" in result.output
    data = json.loads(invoke("inspect", tiny_bundle, "--json").stdout)
    assert data["intact"] is True and data["manifest"]["family"] == "qwen3"


def test_inspect_exits_1_on_hash_mismatch(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "tokenizer.json").write_text("{}")
    result = invoke("inspect", copy)
    assert result.exit_code == 1 and "MISMATCH" in result.output


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = invoke("demo", "-o", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "parity:     PASS" in result.output
    assert (tmp_path / "demo" / "bundle" / "reports" / "parity.md").is_file()
    again = invoke("demo", "-o", tmp_path / "demo")  # re-running replaces the previous demo
    assert again.exit_code == 0, again.output


def test_demo_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    result = invoke("demo", "-o", tmp_path)
    assert result.exit_code == 2 and "not a demo directory" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_export_exits_1_when_validation_fails(tiny_checkpoint: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import qwen3emb.validate.compare as compare

    monkeypatch.setattr(compare.ArtifactResult, "failures", property(lambda self: ["forced"]))
    out = tmp_path / "b"
    result = invoke("export", tiny_checkpoint, "-o", out, "--max-length", "64")
    assert result.exit_code == 1
    assert "below its fidelity floor" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["status"] == "failed"  # kept, marked, and refused by the runtime


def test_export_defaults_to_the_checkpoints_max_length(tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    """No --max-length: the bundle reads what the checkpoint reads (1024 for tiny)."""
    result = invoke("export", tiny_checkpoint, "-o", tmp_path / "b", "--no-validate")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert manifest["tokenizer"]["max_length"] == config["max_position_embeddings"]


def test_negative_long_probe_exits_2_and_writes_nothing(tiny_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    result = invoke("export", tiny_checkpoint, "-o", tmp_path / "out", "--long-probe", "-5")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--long-probe -5 is negative" in lines[0]
    assert not (tmp_path / "out").exists()
