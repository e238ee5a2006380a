"""Shared fixtures: tiny random checkpoints and bundles, built once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# Nothing in the tests may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The runtime's int8 kernel copies (qwen3emb.runtime.kernels) go to a throwaway cache.
os.environ.setdefault("QWEN3EMB_CACHE", tempfile.mkdtemp(prefix="qwen3emb-cache-"))


TORCH_BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "safetensors")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None
    sys.meta_path.insert(0, Block())
""")
"""Prepended to subprocess code: importing torch & co. raises, so a torch-free claim is tested."""


@pytest.fixture(scope="session")
def run_without_torch() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run Python ``code`` in a subprocess where torch, transformers and onnx cannot import."""

    def run(code: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", TORCH_BLOCKER + textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def vl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL checkpoint with the real geometry."""
    from qwen3emb.convert.random_vl_checkpoint import build_random_vl_checkpoint

    return build_random_vl_checkpoint(tmp_path_factory.mktemp("vl-ckpt") / "tiny-vl")


@pytest.fixture(scope="session")
def vl_bundle(vl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The VL checkpoint exported (and validated, fp32) with the same command as a text model."""
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app

    out = tmp_path_factory.mktemp("vl-bundles") / "tiny-vl"
    result = CliRunner().invoke(create_app(), ["export", str(vl_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Qwen3 embedding checkpoint with a real BPE tokenizer."""
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny")


@pytest.fixture(scope="session")
def deep_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny geometry with 4 layers: deep enough that the exporter replicates layers."""
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "deep", preset="tiny",
                                   num_hidden_layers=4)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with validation (fp32)."""
    from qwen3emb.pipeline import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    result = export_bundle(tiny_checkpoint, out, validate=True)
    assert result.passed, result.report.to_dict()
    return out


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path):
    """The HuggingFace reference for the tiny checkpoint."""
    from qwen3emb.validate.reference import ReferenceEmbedder

    return ReferenceEmbedder(tiny_checkpoint)


@pytest.fixture(scope="session")
def wrong_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose graph comes from other weights (seed 1) but whose hashes are consistent."""
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint
    from qwen3emb.manifest import file_entry, write_json_atomic
    from qwen3emb.pipeline import export_bundle

    root = tmp_path_factory.mktemp("wrong")
    other = build_random_checkpoint(root / "ckpt", preset="tiny", seed=1)
    other_bundle = export_bundle(other, root / "other", validate=False).bundle
    wrong = root / "wrong"
    shutil.copytree(tiny_bundle, wrong)
    shutil.copyfile(other_bundle / "onnx" / "model.onnx", wrong / "onnx" / "model.onnx")
    manifest = json.loads((wrong / "manifest.json").read_text())
    manifest["artifacts"] = [
        file_entry(wrong, wrong / a["path"], **{k: v for k, v in a.items()
                                                if k not in ("path", "size", "sha256")})
        for a in manifest["artifacts"]
    ]
    manifest["parity"] = {"status": "not-run"}
    write_json_atomic(wrong / "manifest.json", manifest)
    return wrong


@pytest.fixture(scope="session")
def reranker_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untied reranker whose tokenizer appends nothing (as released) and a tied one (as the
    0.6B) whose tokenizer appends ``<|endoftext|>``; both named like the hub's."""
    from qwen3emb.convert.random_checkpoint import build_random_reranker

    root = tmp_path_factory.mktemp("rerankers")
    return {"untied": build_random_reranker(root / "tiny-Qwen3-Reranker", seed=1),
            "tied": build_random_reranker(root / "tied-qwen3-reranker", tied=True,
                                          append_end_token=True, seed=2)}


@pytest.fixture(scope="session")
def reranker_bundles(reranker_checkpoints: dict[str, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each checkpoint exported by name (no --task) in fp32 and fp16, validated."""
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app

    root = tmp_path_factory.mktemp("reranker-bundles")
    out = {}
    for name, checkpoint in reranker_checkpoints.items():
        result = CliRunner().invoke(create_app(), ["export", str(checkpoint), "-o",
                                                   str(root / name), "--precision", "fp16"])
        assert result.exit_code == 0, result.output
        assert "task: rerank (from the name" in result.stderr  # said, as it was not asked
        out[name] = root / name
    return out
