"""Qwen3-VL through the streamed exporter: meta tracing, weights read shard by shard.

The streamed graphs must be the bytes the in-memory path writes (the whole fp32 model loaded,
its state dict bound to the same trace), and the streamed path must never load the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwen3emb.convert import family_for, load_checkpoint
from qwen3emb.export.onnx.trace import export_onnx


@pytest.mark.slow
def test_streamed_vl_graphs_are_byte_identical_to_in_memory(vl_checkpoint: Path,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    family = family_for(load_checkpoint(vl_checkpoint))
    assert family.streamable
    specs = family.graph_specs(family.embedding_dim, 18)
    assert [s.name for s in specs] == ["vision", "decoder"]
    in_memory = {s.name: export_onnx(family, tmp_path / "m" / f"{s.name}.onnx", s,
                                     weights="memory", trace="full") for s in specs}

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the streamed export loaded the fp32 model")

    monkeypatch.setattr(type(family), "load_backbone", no_loading)
    for spec in specs:
        streamed = export_onnx(family, tmp_path / "s" / f"{spec.name}.onnx", spec)
        assert streamed.read_bytes() == in_memory[spec.name].read_bytes(), spec.name


def test_vl_weights_map_to_checkpoint_tensors_per_graph(vl_checkpoint: Path) -> None:
    from qwen3emb.convert.weights import ShardedWeights

    family = family_for(load_checkpoint(vl_checkpoint))
    shards = ShardedWeights(family.checkpoint.weight_files)
    # The decoder module holds the language model as ``lm``; the vision module as ``visual``.
    decoder_key = family.backbone_name("decoder", "lm.layers.0.mlp.down_proj.weight")
    assert decoder_key == "language_model.layers.0.mlp.down_proj.weight"
    assert family.checkpoint_key(decoder_key, shards) == decoder_key
    assert family.backbone_name("vision", "visual.blocks.0.attn.qkv.weight") in shards
    # A checkpoint saved from Qwen3VLForConditionalGeneration prefixes both with ``model.``.
    assert family.checkpoint_key(decoder_key, {"model." + decoder_key}) == "model." + decoder_key
    # The rotary tables are computed, not stored: both come from the config.
    buffers = family.host_buffers(family.meta_backbone())
    vision_head = (int(family.vision_config["hidden_size"])
                   // int(family.vision_config["num_heads"]))
    assert buffers["visual.rotary_pos_emb.inv_freq"].shape == (vision_head // 4,)
    text_head = int(family.text_config["head_dim"])
    inv_freq = buffers["language_model.rotary_emb.inv_freq"]
    assert inv_freq.shape == (text_head // 2,) and inv_freq.dtype == np.float32
    assert "language_model.rotary_emb.inv_freq" not in shards
