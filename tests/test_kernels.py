"""The runtime's int8 kernel choice: the same integers on the faster exact kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

K, N = 256, 96


def _graph(path: Path, *, per_row: bool) -> tuple[Path, np.ndarray]:
    """A one-MatMul int8 graph as our exporter writes it (weights uint8 around 128)."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    codes = (np.clip(np.rint(w / scale), -127, 127).astype(np.int16) + 128).astype(np.uint8)
    inits = [nh.from_array(codes, "w_q"), nh.from_array(scale, "w_scale"),
             nh.from_array(np.full(N, 128, np.uint8), "w_zero")]
    if per_row:
        nodes = [
            helper.make_node("Abs", ["x"], ["a"]),
            helper.make_node("ReduceMax", ["a", "axes"], ["rows"], keepdims=1),
            helper.make_node("Div", ["x", "rows"], ["xs"]),
            helper.make_node("QuantizeLinear", ["xs", "step", "zp"], ["xq"]),
            helper.make_node("MatMulIntegerToFloat", ["xq", "w_q", "step", "w_scale", "zp",
                                                      "w_zero"], ["o"], domain="com.microsoft"),
            helper.make_node("Mul", ["o", "rows"], ["y"])]
        inits += [nh.from_array(np.asarray([-1], np.int64), "axes"),
                  nh.from_array(np.asarray(2 / 255, np.float32), "step"),
                  nh.from_array(np.asarray(128, np.uint8), "zp")]
    else:
        nodes = [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
            helper.make_node("MatMulInteger", ["xq", "w_q", "xz", "w_zero"], ["i"]),
            helper.make_node("Cast", ["i"], ["f"], to=T.FLOAT),
            helper.make_node("Mul", ["xs", "w_scale"], ["s"]),
            helper.make_node("Mul", ["f", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("y", T.FLOAT, ["m", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save(model, path)
    x = rng.normal(0, 1, (64, K)).astype(np.float32)
    x[:, 3] *= 30  # an outlier channel: large codes, where a saturating kernel would show
    return path, x


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("per_row", [True, False])
def test_u8s8_copy_has_int8_codes_and_the_same_outputs(tmp_path, monkeypatch, per_row):
    import onnx

    from qwen3emb.runtime import kernels

    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    source, x = _graph(tmp_path / "model.onnx", per_row=per_row)
    monkeypatch.setenv(kernels.KERNEL_ENV, "u8u8")
    assert kernels.for_cpu(source) == source
    monkeypatch.setenv(kernels.KERNEL_ENV, "u8s8")
    copy = kernels.for_cpu(source)
    assert copy != source and copy.parent.parent == tmp_path / "cache" / "u8s8"
    inits = {t.name: t for t in onnx.load(str(copy)).graph.initializer}
    assert inits["w_q"].data_type == onnx.TensorProto.INT8
    assert not onnx.numpy_helper.to_array(inits["w_zero"]).any()
    original = onnx.load(str(source)).graph.initializer
    codes = {t.name: onnx.numpy_helper.to_array(t) for t in original}["w_q"]
    shifted = onnx.numpy_helper.to_array(inits["w_q"])
    assert np.array_equal(shifted.astype(np.int16) + 128, codes)
    # The second load reuses the copy.
    stamp = copy.stat().st_mtime_ns
    assert kernels.for_cpu(source) == copy and copy.stat().st_mtime_ns == stamp
    if kernels.cpu_has_vnni():  # exact there: the same integers, the same outputs
        np.testing.assert_allclose(_run(copy, x), _run(source, x), rtol=0, atol=1e-6)


def test_auto_choice_follows_the_cpu(tmp_path, monkeypatch):
    from qwen3emb.runtime import kernels

    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    assert kernels.int8_kernel() == ("u8s8" if kernels.cpu_has_vnni() else "u8u8")
    source, _ = _graph(tmp_path / "model.onnx", per_row=True)
    assert (kernels.for_cpu(source) != source) == kernels.cpu_has_vnni()


def test_graph_without_integer_weights_is_loaded_as_is(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    from qwen3emb.runtime import kernels

    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(kernels.KERNEL_ENV, "u8s8")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2])])
    path = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph), path)
    assert kernels.for_cpu(path) == path
    assert kernels.for_cpu(path) == path  # the marker is read, nothing is parsed again
    assert len(list((tmp_path / "cache" / "u8s8").iterdir())) == 1


def test_unwritable_cache_falls_back_to_the_bundle_file(tmp_path, monkeypatch):
    from qwen3emb.runtime import kernels

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(kernels.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setenv(kernels.KERNEL_ENV, "u8s8")
    source, _ = _graph(tmp_path / "model.onnx", per_row=True)
    assert kernels.for_cpu(source) == source


def test_copies_of_removed_or_changed_files_are_pruned(tmp_path, monkeypatch):
    """An export validates its staged files: their copies must not pile up in the cache."""
    import os

    from qwen3emb.runtime import kernels

    cache = tmp_path / "cache"
    monkeypatch.setenv(kernels.CACHE_ENV, str(cache))
    monkeypatch.setenv(kernels.KERNEL_ENV, "u8s8")
    staged, _ = _graph(tmp_path / "staged.onnx", per_row=True)
    kept, _ = _graph(tmp_path / "kept.onnx", per_row=False)
    first, second = kernels.for_cpu(staged), kernels.for_cpu(kept)
    staged.unlink()
    os.utime(kept, ns=(1, 1))  # changed since its copy was made
    other, _ = _graph(tmp_path / "other.onnx", per_row=True)
    third = kernels.for_cpu(other)  # writing a copy prunes the stale ones
    assert not first.exists() and not second.exists() and third.exists()
    assert kernels.for_cpu(kept).exists()  # a changed file gets a fresh copy
    assert len(list((cache / "u8s8").iterdir())) == 2
