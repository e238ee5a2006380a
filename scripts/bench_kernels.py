"""One weight MatMul under every integer kernel onnxruntime and OpenVINO offer, timed.

    python scripts/bench_kernels.py 128 1024 3072          # rows K N (8 x 16 tokens, gate/up)
    OUT=40 python scripts/bench_kernels.py 1024 1024 3072  # one input channel 40x the others

Weights N(0, 0.05), inputs N(0, 1) with input channel 7 multiplied by ``OUT`` (default 1);
prints the best of 10 runs on 2 threads and the relative output error against fp32, for fp32,
per-tensor and per-row dynamic int8 (uint8 x uint8 and uint8 x int8 weights), 8-bit and 4-bit
MatMulNBits (blocks 32 / 128, accuracy levels 0 and 4) and weight-only DequantizeLinear ->
MatMul, each on onnxruntime's CPU provider and on OpenVINO's CPU plugin.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

THREADS = 2


def graph(nodes: list[Any], inits: list[Any], k: int, n: int) -> Any:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("y", T.FLOAT, ["m", n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21),
                                                helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def nbits(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    k, n = w.shape
    blocked = w.T.reshape(n, k // block, block)
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(blocked).max(-1) / levels
    codes = (np.clip(np.round(blocked / scale[..., None]), -levels, levels).astype(np.int16)
             + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return codes.reshape(n, k // block, -1), scale.astype(np.float32).reshape(-1)


def cases(w: np.ndarray) -> dict[str, Any]:
    k, n = w.shape
    scale = (np.abs(w).max(0) / 127).astype(np.float32)
    codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    u8 = (codes.astype(np.int16) + 128).astype(np.uint8)
    out = {"fp32": graph([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         [nh.from_array(w, "w")], k, n)}
    stored = {"u8u8": (u8, np.full(n, 128, np.uint8)), "u8s8": (codes, np.zeros(n, np.int8))}
    for label, (wq, wz) in stored.items():
        weights = [nh.from_array(wq, "wq"), nh.from_array(wz, "wz"), nh.from_array(scale, "ws")]
        out[f"per-tensor {label}"] = graph([
            helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
            helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["i"]),
            helper.make_node("Cast", ["i"], ["f"], to=T.FLOAT),
            helper.make_node("Mul", ["xs", "ws"], ["ss"]),
            helper.make_node("Mul", ["f", "ss"], ["y"])], weights, k, n)
        out[f"per-row {label}"] = graph([
            helper.make_node("Abs", ["x"], ["a"]),
            helper.make_node("ReduceMax", ["a", "ax"], ["rm"], keepdims=1),
            helper.make_node("Div", ["x", "rm"], ["xs"]),
            helper.make_node("QuantizeLinear", ["xs", "st", "zp"], ["xq"]),
            helper.make_node("MatMulIntegerToFloat", ["xq", "wq", "st", "ws", "zp", "wz"], ["o"],
                             domain="com.microsoft"),
            helper.make_node("Mul", ["o", "rm"], ["y"])],
            [*weights, nh.from_array(np.asarray([-1], np.int64), "ax"),
             nh.from_array(np.asarray(2 / 255, np.float32), "st"),
             nh.from_array(np.asarray(128, np.uint8), "zp")], k, n)
    for bits, block, level in ((8, 32, 4), (8, 128, 4), (8, 32, 0), (4, 32, 4)):
        packed, scales = nbits(w, bits, block)
        out[f"MatMulNBits {bits}-bit b{block} acc{level}"] = graph(
            [helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft",
                              K=k, N=n, bits=bits, block_size=block, accuracy_level=level)],
            [nh.from_array(packed, "q"), nh.from_array(scales, "s")], k, n)
    out["weight-only DequantizeLinear -> MatMul"] = graph([
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=1),
        helper.make_node("MatMul", ["x", "wd"], ["y"])],
        [nh.from_array(codes, "wq"), nh.from_array(scale, "ws")], k, n)
    return out


def best_ms(run: Callable[[], Any], repeats: int = 10) -> float:
    run()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> int:
    import onnxruntime as ort

    m, k, n = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (1024, 1024, 3072)
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    x[:, 7] *= float(os.environ.get("OUT", 1))
    exact = x @ w

    def error(y: np.ndarray) -> float:
        return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))

    print(f"rows={m} K={k} N={n}, onnxruntime {ort.__version__}, {THREADS} threads")
    work = tempfile.mkdtemp(prefix="bench-kernels-")
    for name, model in cases(w).items():
        path = os.path.join(work, f"{len(os.listdir(work))}.onnx")
        onnx.save(model, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        y = session.run(None, {"x": x})[0]
        ms = best_ms(lambda s=session: s.run(None, {"x": x}))
        print(f"onnxruntime {name:42s} {ms:8.2f} ms  error {error(y):.4f}")
        try:
            import openvino as ov
        except ImportError:
            continue
        compiled = ov.Core().compile_model(path, "CPU", {
            "INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()

        def infer(r: Any = request) -> np.ndarray:
            r.infer({"x": x})
            return r.get_output_tensor(0).data

        y = infer().copy()
        print(f"OpenVINO    {name:42s} {best_ms(infer):8.2f} ms  error {error(y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
