"""Shared fixtures: tiny random checkpoints and bundles, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Qwen3 embedding checkpoint with a real BPE tokenizer."""
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with validation (fp32)."""
    from qwen3emb.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    result = export_bundle(tiny_checkpoint, out, validate=True)
    assert result.passed, result.report.to_dict()
    return out


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path):  # noqa: ANN201 - ReferenceEmbedder needs torch
    """The HuggingFace reference for the tiny checkpoint."""
    from qwen3emb.validate.reference import ReferenceEmbedder

    return ReferenceEmbedder(tiny_checkpoint)
