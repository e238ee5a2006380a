"""The streaming export (meta trace + tensors read shard by shard) equals the in-memory one."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen3emb.convert import family_for, load_checkpoint
from qwen3emb.convert.weights import ShardedWeights
from qwen3emb.errors import OutputError
from qwen3emb.export.onnx.trace import export_onnx
from qwen3emb.spec import TextGraphSpec


def test_streamed_and_in_memory_exports_are_bit_identical(tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    family = family_for(load_checkpoint(tiny_checkpoint))
    spec = TextGraphSpec(dim=64)
    streamed = export_onnx(family, tmp_path / "s" / "model.onnx", spec, weights="stream")
    in_memory = export_onnx(family, tmp_path / "m" / "model.onnx", spec, weights="memory")
    assert streamed.read_bytes() == in_memory.read_bytes()


def test_sharded_checkpoint_streams_across_shards(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    keys = sorted(tensors)
    half = len(keys) // 2
    save_file({k: tensors[k] for k in keys[:half]}, ckpt / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in keys[half:]}, ckpt / "model-00002-of-00002.safetensors")
    weights = ShardedWeights(load_checkpoint(ckpt).weight_files)
    assert len(weights) == len(keys)
    key = keys[-1]
    assert torch.equal(torch.from_numpy(weights.load(key)), tensors[key].float())
    family = family_for(load_checkpoint(ckpt))
    one = export_onnx(family, tmp_path / "a" / "model.onnx", TextGraphSpec(dim=64))
    two = export_onnx(family_for(load_checkpoint(tiny_checkpoint)), tmp_path / "b" / "model.onnx",
                      TextGraphSpec(dim=64))
    assert one.read_bytes() == two.read_bytes()


def test_checkpoint_missing_a_tensor_is_a_clear_error(tiny_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "incomplete"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["norm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    family = family_for(load_checkpoint(ckpt))
    with pytest.raises(OutputError, match="lacks tensors the graph needs: \\['norm.weight'\\]"):
        export_onnx(family, tmp_path / "x" / "model.onnx", TextGraphSpec(dim=64))
