"""Bundle layout, manifest, graph contract and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen3emb.constants import DEFAULT_TASK
from qwen3emb.errors import CheckpointError, InputError, OutputError
from qwen3emb.manifest import read_manifest, sha256_file
from qwen3emb.pipeline import export_bundle


def test_bundle_has_model_tokenizer_manifest_and_report(tiny_bundle: Path) -> None:
    assert (tiny_bundle / "onnx" / "model.onnx").is_file()
    assert (tiny_bundle / "tokenizer.json").is_file()
    for name in ("parity.json", "parity.md", "parity.junit.xml"):
        assert (tiny_bundle / "reports" / name).is_file()
    assert not list(tiny_bundle.parent.glob(".*partial*"))


def test_manifest_records_what_a_deployer_needs(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    data = read_manifest(tiny_bundle).data
    assert data["family"] == "qwen3"
    assert data["embedding"] == {"dim": 64, "output_dim": 64, "mrl_min": 32, "mrl_max": 64,
                                 "pooling": "last_token", "normalization": "l2"}
    assert data["prompt"]["query_template"] == "Instruct: {task}\nQuery:{query}"
    assert data["prompt"]["default_task"] == DEFAULT_TASK
    assert data["tokenizer"]["end_token"] == "<|endoftext|>"
    assert data["tokenizer"]["max_length"] == 1024  # the checkpoint's max_position_embeddings
    assert data["source"]["weights"][0]["sha256"] == sha256_file(
        tiny_checkpoint / "model.safetensors")
    assert data["onnx"]["opset"] == 18
    assert {"torch", "transformers", "onnx", "onnxruntime", "qwen3emb-export"} <= set(
        data["versions"])
    assert data["parity"]["status"] == "passed"
    for entry in data["artifacts"]:
        path = tiny_bundle / entry["path"]
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path)


def test_tokenizer_files_are_copied_unchanged(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_bundle / name).read_bytes() == (tiny_checkpoint / name).read_bytes()


def test_graph_has_dynamic_batch_and_sequence_and_no_cache_inputs(tiny_bundle: Path) -> None:
    import onnx

    model = onnx.load(str(tiny_bundle / "onnx" / "model.onnx"), load_external_data=False)

    def shape(v: onnx.ValueInfoProto) -> list[object]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs = {v.name: (v.type.tensor_type.elem_type, shape(v)) for v in model.graph.input}
    assert inputs == {
        "input_ids": (onnx.TensorProto.INT64, ["batch", "sequence"]),
        "attention_mask": (onnx.TensorProto.INT64, ["batch", "sequence"]),
    }
    # sentence_embedding first; last_hidden_state (it, broadcast) for other loaders.
    output, hidden = model.graph.output
    assert output.name == "sentence_embedding"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert shape(output) == ["batch", 64]
    assert hidden.name == "last_hidden_state"
    assert hidden.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert shape(hidden) == ["batch", "sequence", 64]


def test_existing_output_is_not_overwritten_without_force(tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists") as info:
        export_bundle(tiny_checkpoint, out, validate=False)
    assert "--force" in info.value.hint
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_output_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="cannot write"):
        export_bundle(tiny_checkpoint, blocker / "bundle", validate=False)


def test_interrupted_export_leaves_nothing_behind(tiny_checkpoint: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import qwen3emb.export.onnx.trace as onnx_export

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_checkpoint, tmp_path / "bundle", validate=False)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_mid_export_is_one_line_and_leaves_nothing(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError deep in a write (a full disk: what a 30 GB fp32 8B graph plus its variants
    met on this machine) ends as one line with a fix and exit 2, not a traceback."""
    import errno

    from typer.testing import CliRunner

    import qwen3emb.export.onnx.trace as onnx_export
    from qwen3emb.cli.app import create_app

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "model.onnx_data")

    monkeypatch.setattr(onnx_export, "export_onnx", full)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(create_app(), ["export", str(tiny_checkpoint), "-o",
                                               str(out / "bundle"), "--no-validate"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == ["error: No space left on device (model.onnx_data). Free disk space or "
                     "fix permissions where the files go (or write elsewhere), then run again"]
    assert "Traceback" not in result.output
    assert list(out.iterdir()) == []


def test_dimensions_outside_mrl_range_are_rejected(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="outside 32..64"):
        export_bundle(tiny_checkpoint, tmp_path / "b", dimensions=16, validate=False)
    assert not (tmp_path / "b").exists()


def test_tokenizer_without_end_token_is_rejected(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    ckpt = tmp_path / "noeot"
    shutil.copytree(tiny_checkpoint, ckpt)
    data = json.loads((ckpt / "tokenizer.json").read_text())
    data["post_processor"] = None
    (ckpt / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not end inputs with <\\|endoftext\\|>"):
        export_bundle(ckpt, tmp_path / "b", validate=False)


@pytest.mark.slow
def test_baked_in_dimensions_give_a_narrower_normalized_output(tiny_checkpoint: Path,
                                                               tmp_path: Path) -> None:
    result = export_bundle(tiny_checkpoint, tmp_path / "mrl", dimensions=48, validate=True)
    assert result.passed
    assert result.manifest["embedding"]["output_dim"] == 48
    from qwen3emb.runtime import TextEmbedder

    vectors = TextEmbedder(result.bundle).encode(["a text", "another"])
    assert vectors.shape == (2, 48)
    assert abs(float((vectors**2).sum(1).max()) - 1.0) < 1e-5


def test_opset_23_attention_graph_passes_parity_with_left_and_right_padding(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    result = export_bundle(tiny_checkpoint, tmp_path / "op23", opset=23, validate=True)
    assert result.passed, result.report.to_dict() if result.report else None
    model = onnx.load(str(result.bundle / "onnx" / "model.onnx"), load_external_data=False)
    assert any(n.op_type == "Attention" for n in model.graph.node)
    checks = {name for art in result.report.to_dict()["artifacts"]
              for name in art["cosines"]} if result.report else set()
    assert any(c.startswith("padding-left:") for c in checks)
    assert any(c.startswith("padding-right:") for c in checks)
