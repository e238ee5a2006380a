"""GGUF files inside a bundle: written next to ONNX, listed in the manifest, validated, embedded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen3emb.cli import create_app
from qwen3emb.errors import InputError
from qwen3emb.pipeline import export_bundle

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")


@pytest.fixture(scope="module")
def mixed_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "bundle"
    result = CliRunner().invoke(create_app(), [
        "export", str(tiny_checkpoint), "-o", str(out), "--format", "onnx", "--format", "gguf",
        "--gguf-type", "f32", "--gguf-type", "q8_0"])
    assert result.exit_code == 0, result.output
    return out


def test_manifest_lists_onnx_and_gguf_with_hashes(mixed_bundle: Path) -> None:
    manifest = json.loads((mixed_bundle / "manifest.json").read_text())
    models = {(a["kind"], a["precision"]) for a in manifest["artifacts"] if a["role"] == "model"}
    assert models == {("onnx", "fp32"), ("gguf", "f32"), ("gguf", "q8_0")}
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"gguf/model-f32.gguf", "gguf/model-q8_0.gguf"} <= paths
    assert manifest["parity"]["status"] == "passed"


def test_report_has_every_artifact_at_its_floor(mixed_bundle: Path) -> None:
    report = json.loads((mixed_bundle / "reports" / "parity.json").read_text())
    by_precision = {a["precision"]: a for a in report["artifacts"]}
    assert set(by_precision) == {"fp32", "f32", "q8_0"}
    assert by_precision["f32"]["min_cosine"] >= 0.99999
    assert by_precision["q8_0"]["min_cosine"] >= 0.99
    assert by_precision["f32"]["kind"] == "gguf"
    assert "probe:over-long" in by_precision["f32"]["cosines"]


def test_embed_with_a_gguf_precision_runs_llama_cpp(mixed_bundle: Path) -> None:
    result = CliRunner().invoke(create_app(), ["embed", str(mixed_bundle), "hello there",
                                               "--precision", "f32"])
    assert result.exit_code == 0, result.output
    gguf_vec = np.array(json.loads(result.stdout.splitlines()[0])["embedding"])
    from qwen3emb.runtime import TextEmbedder

    onnx_vec = TextEmbedder(mixed_bundle).encode(["hello there"])[0]
    assert float(gguf_vec @ onnx_vec) > 0.99999


def test_gguf_only_bundle(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = export_bundle(tiny_checkpoint, tmp_path / "g", formats=["gguf"], validate=False)
    kinds = {a["kind"] for a in result.manifest["artifacts"]}
    assert kinds == {"gguf", "tokenizer"} and "onnx" not in result.manifest
    assert (tmp_path / "g" / "gguf" / "model-f16.gguf").is_file()


@pytest.mark.parametrize("kwargs, message", [
    ({"formats": ["tflite"]}, "unknown format 'tflite'"),
    ({"formats": ["gguf"], "gguf_types": ["q3_xs"]}, "unknown GGUF type 'q3_xs'"),
])
def test_bad_format_choices_fail_before_any_work(tiny_checkpoint: Path, tmp_path: Path,
                                                 kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        export_bundle(tiny_checkpoint, tmp_path / "x", validate=False, **kwargs)
    assert not (tmp_path / "x").exists()
