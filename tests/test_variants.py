"""Variants are built one weight tensor at a time, and calibration piece by piece, exactly."""

from __future__ import annotations

import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 bundle whose weights (~17 MB) dwarf the graph and its largest tensor (1 MB)."""
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint
    from qwen3emb.pipeline import export_bundle

    root = tmp_path_factory.mktemp("wide")
    checkpoint = build_random_checkpoint(root / "ckpt", preset="small", hidden_size=256,
                                         intermediate_size=1024, num_hidden_layers=4)
    return export_bundle(checkpoint, root / "bundle", validate=False).bundle


@pytest.fixture(scope="module")
def wide_calibration(wide_bundle: Path):
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds

    return calibrate(wide_bundle / "onnx" / "model.onnx",
                     calibration_feeds(wide_bundle / "tokenizer.json"))


@pytest.fixture(scope="module")
def external_source(wide_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wide fp32 graph with every weight in ``model.onnx.data``, as large exports have."""
    import onnx

    path = tmp_path_factory.mktemp("external") / "model.onnx"
    onnx.save_model(onnx.load(str(wide_bundle / "onnx" / "model.onnx")), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def _weight_bytes(path: Path) -> tuple[int, int]:
    """Total and largest float initializer bytes of a graph."""
    import onnx
    from onnx import numpy_helper

    sizes = [numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT]
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_variant_holds_one_source_tensor_at_a_time(wide_bundle, external_source,
                                                   wide_calibration, tmp_path, monkeypatch,
                                                   precision):
    from qwen3emb.export.onnx.lazy import LazyGraph
    from qwen3emb.export.quant.variants import build_variant

    source = external_source
    total, largest = _weight_bytes(wide_bundle / "onnx" / "model.onnx")
    assert total > 12 * largest
    live, most = [0], [0]
    original = LazyGraph.read

    def counted(self, name):
        array = original(self, name)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(array, lambda: live.__setitem__(0, live[0] - 1))
        return array

    monkeypatch.setattr(LazyGraph, "read", counted)
    tracemalloc.start()
    try:
        variant = build_variant(source, precision, calibration=wide_calibration,
                                target=tmp_path / "model.onnx", external=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert variant.files == (tmp_path / "model.onnx", tmp_path / "model.onnx_data")
    assert most[0] == 1, "two fp32 source tensors were in memory at once"
    # The source copy, its transformed copy and the outputs of one tensor, plus the graph.
    assert peak < 6 * largest + 2_000_000, (peak, largest, total)
    assert peak < total / 2


def test_piecewise_calibration_equals_one_whole_graph_run(wide_bundle, wide_calibration):
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds

    source = wide_bundle / "onnx" / "model.onnx"
    total, largest = _weight_bytes(source)
    feeds = calibration_feeds(wide_bundle / "tokenizer.json")[:6]
    whole = calibrate(source, feeds, chunk_bytes=total * 2)
    pieces = calibrate(source, feeds, chunk_bytes=2 * largest)
    assert whole.pieces == 1 and pieces.pieces >= 6
    assert pieces.largest_piece_bytes <= 2 * largest
    assert set(pieces.ranges) == set(whole.ranges) and len(whole.ranges) >= 4 * 4
    for name, peak in whole.ranges.items():
        np.testing.assert_allclose(pieces.ranges[name], peak, rtol=1e-5, atol=1e-6)
    assert "6 texts" in pieces.describe() and f"{pieces.pieces} consecutive pieces" in (
        pieces.describe())
    assert not list(source.parent.glob(".*calibrate*")), "the scratch graph was left behind"


def test_external_and_inline_sources_give_the_same_variant(wide_bundle, external_source,
                                                           wide_calibration, tmp_path):
    """One code path: a source whose weights live in a data file quantizes identically."""
    import onnxruntime as ort

    from qwen3emb.export.quant.variants import build_variant

    inline, external = wide_bundle / "onnx" / "model.onnx", external_source
    ids = np.array([[5, 17, 99, 3, 151643 % 1000]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    outputs = []
    for source, target in ((inline, tmp_path / "a.onnx"), (external, tmp_path / "b.onnx")):
        variant = build_variant(source, "int4", calibration=wide_calibration, target=target)
        session = ort.InferenceSession(str(variant.path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feed)[0])
    assert variant.files[1:] == (target.with_name("b.onnx_data"),)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert np.isfinite(outputs[0]).all()


def test_int8_needs_calibration_except_nbits8(wide_bundle, tmp_path):
    from qwen3emb.errors import InputError
    from qwen3emb.export.quant.variants import build_variant

    source = wide_bundle / "onnx" / "model.onnx"
    with pytest.raises(InputError, match="int8 \\(smoothquant\\) needs calibration ranges"):
        build_variant(source, "int8", target=tmp_path / "x.onnx")
    variant = build_variant(source, "int8", int8_scheme="nbits8", target=tmp_path / "y.onnx")
    assert variant.settings["scheme"] == "nbits8" and "calibration" not in variant.settings


def test_variant_graph_uses_onnxruntime_quantizer_patterns(wide_bundle, wide_calibration,
                                                           tmp_path):
    """int8 keeps quantize_dynamic's node pattern, so onnxruntime fuses it as before."""
    from collections import Counter

    import onnx

    from qwen3emb.export.quant.variants import build_variant

    source = wide_bundle / "onnx" / "model.onnx"
    int8 = build_variant(source, "int8", calibration=wide_calibration,
                         target=tmp_path / "int8.onnx")
    model = onnx.load(str(int8.path))
    ops = Counter(n.op_type for n in model.graph.node)
    matmuls = 7 * 4
    # Weights as uint8 around 128: uint8 x int8 saturates in int16 on CPUs without VNNI.
    inits = {t.name: t for t in model.graph.initializer}
    weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMulInteger"]
    zeros = [n.input[3] for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert weights and all(inits[w].data_type == onnx.TensorProto.UINT8 for w in weights)
    assert all(set(onnx.numpy_helper.to_array(inits[z]).ravel()) == {128} for z in zeros)
    assert ops["MatMulInteger"] + len(int8.settings["fp32_matmuls"]) == matmuls
    # Shared by q/k/v and by gate/up; the last layer's q_proj reads only the pooled rows.
    assert ops["DynamicQuantizeLinear"] == 4 * 4 + 1
    gathers = Counter(n.op_type for n in onnx.load(str(source)).graph.node)["Gather"]
    assert ops["GatherBlockQuantized"] == 1 and ops["Gather"] == gathers - 1  # the table
    int4 = build_variant(source, "int4", calibration=wide_calibration,
                         target=tmp_path / "int4.onnx")
    graph = onnx.load(str(int4.path)).graph.node
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph
            if n.op_type == "MatMulNBits"}
    dynamic = [n.name for n in graph if n.op_type == "MatMulInteger"]
    assert len(bits) + len(dynamic) == matmuls
    wide = ("v_proj", "o_proj", "down_proj")
    assert all((b == 8) == any(w in n for w in wide) for n, b in bits.items())
    assert len(dynamic) + sum(b == 8 for b in bits.values()) == 3 * 4
    assert all(any(w in n for w in wide) for n in dynamic)
    fallback = {f"{m}_Q8" for m in int4.settings["8bit_blockwise_matmuls"]}
    assert {n for n, b in bits.items() if b == 8} == fallback
