"""Qwen3-VL through the streamed exporter: meta tracing, weights read shard by shard, decoder
layers replicated past the deepstack layers.

The streamed graphs must be the bytes the in-memory path writes (the whole fp32 model loaded,
its state dict bound to the same trace), and the streamed path must never load the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwen3emb.convert import family_for, load_checkpoint
from qwen3emb.export.onnx.trace import export_onnx

DEEP_LAYERS = 7
"""Text decoder depth of the deep fixture: 3 deepstack layers + the template traced (5), two
copies."""


@pytest.fixture(scope="module")
def deep_vl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny VL shape with a 7-layer decoder, written straight to two shards."""
    from qwen3emb.convert.random_vl_checkpoint import write_random_vl_shards

    return write_random_vl_shards(tmp_path_factory.mktemp("vl-deep") / "deep", preset="tiny",
                                  num_hidden_layers=DEEP_LAYERS, shard_bytes=20 << 20)


def _forbid_loading(family: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the streamed export loaded the fp32 model")

    monkeypatch.setattr(type(family), "load_backbone", no_loading)


@pytest.mark.slow
def test_streamed_vision_graph_is_byte_identical_to_in_memory(
        vl_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    family = family_for(load_checkpoint(vl_checkpoint))
    assert family.streamable
    vision, _ = family.graph_specs(family.embedding_dim, 18)
    assert family.layer_plan("vision") is None  # the tower is traced whole
    in_memory = export_onnx(family, tmp_path / "m" / "vision.onnx", vision, weights="memory")
    _forbid_loading(family, monkeypatch)
    streamed = export_onnx(family, tmp_path / "s" / "vision.onnx", vision)
    assert streamed.read_bytes() == in_memory.read_bytes()


@pytest.mark.slow
def test_streamed_replicated_decoder_is_byte_identical_and_embeds_like_torch(
        deep_vl_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    family = family_for(load_checkpoint(deep_vl_checkpoint))
    _, decoder = family.graph_specs(family.embedding_dim, 18)
    assert family.layer_plan("decoder") == ("lm.layers", 4, 0)
    in_memory = export_onnx(family, tmp_path / "m" / "decoder.onnx", decoder, weights="memory")
    backbone = family.load_backbone()
    with monkeypatch.context() as patch:
        _forbid_loading(family, patch)
        streamed = export_onnx(family, tmp_path / "s" / "decoder.onnx", decoder)
    assert streamed.read_bytes() == in_memory.read_bytes()

    graph = onnx.load(str(streamed), load_external_data=False).graph
    layers = {int(t.name.split(".")[2]) for t in graph.initializer
              if t.name.startswith("lm.layers.")}
    assert layers == set(range(DEEP_LAYERS))
    copied = f"_layer{DEEP_LAYERS - 1}"  # the replicator's suffix for values of a copy
    assert any(name.endswith(copied) for n in graph.node for name in n.output)
    example, _ = family.trace_inputs("decoder", decoder)
    feeds = {name: t.numpy() for name, t in zip(decoder.input_names, example)}
    got = ort.InferenceSession(str(streamed)).run(None, feeds)[0]
    with torch.no_grad():
        want = family.graph_module(backbone, "decoder", None)(*example).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


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
