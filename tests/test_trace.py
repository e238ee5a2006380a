"""A shallow trace grown to full depth (replicated layers) is the full-depth trace."""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qwen3emb.convert import family_for, load_checkpoint
from qwen3emb.errors import InputError
from qwen3emb.export.onnx import trace as onnx_export
from qwen3emb.export.onnx.replicate import ReplicationError, replicate_layers
from qwen3emb.spec import TextGraphSpec

SPEC = TextGraphSpec(dim=64)


@pytest.fixture(scope="module")
def exports(deep_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 4-layer checkpoint exported shallow (streamed and in memory) and full-depth."""
    family = family_for(load_checkpoint(deep_checkpoint))
    root = tmp_path_factory.mktemp("trace")
    return {
        name: onnx_export.export_onnx(family, root / name / "model.onnx", SPEC, trace=trace,
                                      weights=weights)
        for name, trace, weights in (("shallow", "shallow", "stream"),
                                     ("shallow-memory", "shallow", "memory"),
                                     ("full", "full", "stream"))
    }


def _embed(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_replicated_layers_embed_like_a_full_trace(exports: dict[str, Path], side: str) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, (3, 11))
    mask = np.ones_like(ids)
    for row, pad in ((0, 4), (1, 1)):  # mixed lengths; row 2 unpadded
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, ids.shape[1] - pad:] = 0
    full = _embed(exports["full"], ids, mask)
    np.testing.assert_allclose(_embed(exports["shallow"], ids, mask), full, atol=1e-6, rtol=0)


def _histogram(model: Any) -> collections.Counter[str]:
    return collections.Counter(f"{n.domain}:{n.op_type}" for n in model.graph.node)


def test_replicated_graph_has_the_full_trace_structure(exports: dict[str, Path]) -> None:
    import onnx

    from qwen3emb.export.onnx.optimize import optimize_graph

    shallow, full = (onnx.load(str(exports[k])) for k in ("shallow", "full"))
    # It really was grown from a 3-layer trace (layers 0, 1 and the pooled last layer, renamed
    # to 3): layer 2 is a copy of layer 1.
    assert any(n.name.endswith("_layer2") for n in shallow.graph.node)
    assert not any(n.name.endswith(("_layer2", "_layer3")) for n in full.graph.node)
    assert len(shallow.graph.node) == len(full.graph.node)
    assert _histogram(shallow) == _histogram(full)
    shapes = {k: sorted((t.name, tuple(t.dims)) for t in m.graph.initializer
                        if t.name.startswith("backbone.layers."))
              for k, m in (("shallow", shallow), ("full", full))}
    assert shapes["shallow"] == shapes["full"]
    assert len(shapes["full"]) == 4 * 11
    # The fp32 optimizer finds every projection and norm by name scope in both.
    stats = [optimize_graph(m).to_dict() for m in (shallow, full)]
    assert stats[0] == stats[1]
    assert stats[0]["named_projections"] == 4 * 7
    assert _histogram(shallow) == _histogram(full)
    names = [sorted(n.name for n in m.graph.node if n.name.endswith("_proj/MatMul"))
             for m in (shallow, full)]
    assert names[0] == names[1] and len(names[0]) == 4 * 7
    assert "backbone.layers.3.mlp.down_proj/MatMul" in names[0]


def _seq(rows: dict[str, Any], producer: dict[str, Any], node: str) -> int | str:
    """The second dimension of ``node``'s output: a number or a symbolic name."""
    dim = rows[producer[node].output[0]]
    return dim.dim_value if dim.HasField("dim_value") else dim.dim_param


def test_last_layer_computes_only_the_pooled_rows(exports: dict[str, Path]) -> None:
    import onnx

    from qwen3emb.export.onnx.fusions import name_projections

    for name in ("shallow", "full"):
        model = onnx.load(str(exports[name]))
        name_projections(model)
        model = onnx.shape_inference.infer_shapes(model)
        rows = {v.name: v.type.tensor_type.shape.dim[1] for v in model.graph.value_info
                if len(v.type.tensor_type.shape.dim) == 3}
        producer = {n.name: n for n in model.graph.node}

        for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            # [batch, sequence, width] in layers 0-2, [batch, 1, width] in the last one.
            assert _seq(rows, producer, f"backbone.layers.2.{proj}/MatMul") == "sequence"
            assert _seq(rows, producer, f"backbone.layers.3.{proj}/MatMul") == 1, (name, proj)
        assert _seq(rows, producer, "backbone.layers.3.self_attn.k_proj/MatMul") == "sequence"


def test_text_graph_has_no_softmax_nan_guards(exports: dict[str, Path]) -> None:
    """Every attention row sees at least itself, so the exporter drops IsNaN/Where, and a
    row that is almost all padding still embeds as it does alone."""
    import onnx

    for name in ("shallow", "full"):
        ops = _histogram(onnx.load(str(exports[name])))
        assert ops[":IsNaN"] == 0 and ops[":Softmax"] == 4, name
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 500, (3, 12))
    for side in ("left", "right"):
        mask = np.ones_like(ids)
        short = slice(0, 11) if side == "left" else slice(1, 12)  # row 0: one real token
        mask[0, short] = 0
        batch = _embed(exports["shallow"], ids, mask)
        assert np.isfinite(batch).all(), side
        real = ids[0:1, 11:] if side == "left" else ids[0:1, :1]
        alone = _embed(exports["shallow"], real, np.ones_like(real))
        np.testing.assert_allclose(batch[0], alone[0], atol=1e-5, rtol=0, err_msg=side)


def test_replicated_graph_streams_the_same_bytes_as_in_memory(exports: dict[str, Path]) -> None:
    assert exports["shallow"].read_bytes() == exports["shallow-memory"].read_bytes()


def test_replication_refuses_a_graph_that_is_already_deep(exports: dict[str, Path]) -> None:
    import onnx_ir as ir

    model = ir.load(str(exports["full"]))
    with pytest.raises(ReplicationError, match="more than 2 layers"):
        replicate_layers(model, "backbone.layers", 6)


def test_trace_falls_back_to_full_depth_when_replication_fails(
        deep_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def refuse(model: Any, scope: str, total: int, tail: int = 0, **options: Any) -> int:
        raise ReplicationError("no residual input")

    monkeypatch.setattr(onnx_export, "replicate_layers", refuse)
    family = family_for(load_checkpoint(deep_checkpoint))
    with caplog.at_level(logging.WARNING, logger="qwen3emb.export.onnx.trace"):
        model = onnx_export.trace_graph(family, SPEC)
    assert "cannot replicate the traced layers (no residual input); tracing all 4" in caplog.text
    assert "backbone.layers.3.mlp.down_proj.weight" in model.graph.initializers


def test_sliding_window_layers_are_not_replicated(tmp_path: Path) -> None:
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint

    uniform = build_random_checkpoint(tmp_path / "u", preset="tiny", num_hidden_layers=3)
    mixed = build_random_checkpoint(tmp_path / "m", preset="tiny", num_hidden_layers=3,
                                    use_sliding_window=True, sliding_window=8,
                                    max_window_layers=1)
    assert family_for(load_checkpoint(uniform)).uniform_layers()
    assert not family_for(load_checkpoint(mixed)).uniform_layers()


def test_skipped_rewrite_does_not_change_the_optimized_graph(tiny_checkpoint: Path) -> None:
    import onnx
    import onnx_ir as ir

    from qwen3emb.convert.weights import ShardedWeights

    family = family_for(load_checkpoint(tiny_checkpoint))
    model = onnx_export.trace_graph(family, SPEC)
    onnx_export.attach_weights(model, family, ShardedWeights(family.checkpoint.weight_files))
    onnx_export.fold_weight_transposes(model)
    traced = ir.to_proto(model).SerializeToString()
    optimized = []
    for skip in (onnx_export.SKIPPED_REWRITES, ()):
        copy = ir.from_proto(onnx.load_from_string(traced))
        onnx_export.optimize_graph(copy, skip=skip)
        optimized.append(ir.to_proto(copy).SerializeToString())
    assert optimized[0] == optimized[1]


def test_unknown_trace_mode_is_an_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    family = family_for(load_checkpoint(tiny_checkpoint))
    with pytest.raises(InputError, match="unknown trace mode 'deep'"):
        onnx_export.export_onnx(family, tmp_path / "model.onnx", SPEC, trace="deep")


def test_a_tail_layer_needs_room(deep_checkpoint: Path) -> None:
    family = family_for(load_checkpoint(deep_checkpoint))
    model = onnx_export._trace(family, SPEC, None, 3)
    with pytest.raises(ReplicationError, match="cannot grow 3 traced layers"):
        replicate_layers(model, "backbone.layers", 2, tail=1)
