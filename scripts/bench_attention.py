"""One attention layer of the 0.6B shape (16 heads, 8 kv heads, head_dim 128), batch 1:
the exporter's unfused sdpa (full mask, repeated kv), our blocked Loop at several block sizes
and onnxruntime's GroupQueryAttention contrib kernel. Each cell runs in its own process
(peak RSS by getrusage), 2 threads, one timed run after the session is built.

    python scripts/bench_attention.py 2048 8192          # all forms
    python scripts/bench_attention.py --cell blocked 8192 256
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from qwen3emb.progress import peak_rss_bytes

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128


def graph(form: str, block: int):
    from onnx import TensorProto as T
    from onnx import helper
    from onnx import numpy_helper as nh

    from qwen3emb.export.onnx.attention import AttentionSite, blocked_attention, shared_inputs

    q = helper.make_tensor_value_info("q", T.FLOAT, [1, HEADS, "s", HEAD_DIM])
    k = helper.make_tensor_value_info("k", T.FLOAT, [1, KV_HEADS, "s", HEAD_DIM])
    v = helper.make_tensor_value_info("v", T.FLOAT, [1, KV_HEADS, "s", HEAD_DIM])
    mask = helper.make_tensor_value_info("attention_mask", T.INT64, [1, "s"])
    out = helper.make_tensor_value_info("o", T.FLOAT, None)
    if form == "blocked":
        nodes, inits, shared = shared_inputs("attention_mask", block)
        more, consts = blocked_attention(AttentionSite("q", "k", "v", "o", HEAD_DIM ** -0.5,
                                                       True, ()), shared, heads=HEADS,
                                         kv_heads=KV_HEADS, head_dim=HEAD_DIM, prefix="a")
        g = helper.make_graph(nodes + more, "g", [q, k, v, mask], [out], initializer=inits + consts)
    elif form == "unfused":  # what the exporter writes: repeat_kv, a [seq, seq] mask
        c = {"a0": [0], "a1": [1], "a2": [2], "z": 0, "o1": 1, "rep": [1, 1, 2, 1, 1],
             "shp": [0, HEADS, -1, HEAD_DIM]}
        inits = [nh.from_array(np.asarray(val, np.int64), name) for name, val in c.items()]
        inits += [nh.from_array(np.asarray(HEAD_DIM ** -0.5, np.float32), "sc"),
                  nh.from_array(np.asarray(0.0, np.float32), "f0"),
                  nh.from_array(np.asarray(-np.inf, np.float32), "ninf")]
        n = helper.make_node
        nodes = [n("Shape", ["attention_mask"], ["S1"], start=1, end=2),
                 n("Squeeze", ["S1", "a0"], ["S"]), n("Range", ["z", "S", "o1"], ["r"]),
                 n("Unsqueeze", ["r", "a1"], ["rr"]), n("Unsqueeze", ["r", "a0"], ["rc"]),
                 n("LessOrEqual", ["rc", "rr"], ["causal"]),
                 n("Cast", ["attention_mask"], ["km"], to=T.BOOL),
                 n("Unsqueeze", ["km", "a1"], ["km3"]), n("And", ["causal", "km3"], ["m"]),
                 n("Unsqueeze", ["m", "a1"], ["m4"]), n("Where", ["m4", "f0", "ninf"], ["bias"])]
        for x in "kv":
            nodes += [n("Unsqueeze", [x, "a2"], [f"{x}5"]), n("Tile", [f"{x}5", "rep"], [f"{x}t"]),
                      n("Reshape", [f"{x}t", "shp"], [f"{x}r"])]
        nodes += [n("Transpose", ["kr"], ["kT"], perm=[0, 1, 3, 2]),
                  n("MatMul", ["q", "kT"], ["s0"]), n("Mul", ["s0", "sc"], ["s1"]),
                  n("Add", ["s1", "bias"], ["s2"]), n("Softmax", ["s2"], ["p"], axis=-1),
                  n("MatMul", ["p", "vr"], ["o"])]
        g = helper.make_graph(nodes, "g", [q, k, v, mask], [out], initializer=inits)
    else:  # GroupQueryAttention: right padding only (seqlens_k), causal built in
        q = helper.make_tensor_value_info("q", T.FLOAT, [1, "s", HEADS * HEAD_DIM])
        k = helper.make_tensor_value_info("k", T.FLOAT, [1, "s", KV_HEADS * HEAD_DIM])
        v = helper.make_tensor_value_info("v", T.FLOAT, [1, "s", KV_HEADS * HEAD_DIM])
        lens = helper.make_tensor_value_info("seqlens_k", T.INT32, [1])
        total = helper.make_tensor_value_info("total", T.INT32, [])
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k",
                                                        "total"], ["o", "pk", "pv"],
                                domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS)
        g = helper.make_graph([node], "g", [q, k, v, lens, total], [out])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                                helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def cell(form: str, seq: int, block: int) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(graph(form, block).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if form == "gqa":
        feeds = {"q": rng.standard_normal((1, seq, HEADS * HEAD_DIM), np.float32),
                 "k": rng.standard_normal((1, seq, KV_HEADS * HEAD_DIM), np.float32),
                 "v": rng.standard_normal((1, seq, KV_HEADS * HEAD_DIM), np.float32),
                 "seqlens_k": np.array([seq - 1], np.int32), "total": np.array(seq, np.int32)}
    else:
        feeds = {"q": rng.standard_normal((1, HEADS, seq, HEAD_DIM), np.float32),
                 "k": rng.standard_normal((1, KV_HEADS, seq, HEAD_DIM), np.float32),
                 "v": rng.standard_normal((1, KV_HEADS, seq, HEAD_DIM), np.float32),
                 "attention_mask": np.ones((1, seq), np.int64)}
    start = time.perf_counter()
    session.run(None, feeds)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes() / 1e9
    label = f"{form}-{block}" if form == "blocked" else form
    print(f"| {label} | {seq} | {seconds:.3f} s | {peak:.2f} GB |")


def main() -> None:
    if sys.argv[1] == "--cell":
        cell(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    print("| form | tokens | time | peak RSS |\n|---|---|---|---|")
    for seq in [int(a) for a in sys.argv[1:]]:
        forms = [("unfused", 0)] if seq <= 8192 else []
        forms += [("blocked", b) for b in (128, 256, 512)] + [("gqa", 0)]
        for form, block in forms:
            subprocess.run([sys.executable, __file__, "--cell", form, str(seq), str(block)],
                           check=False)


if __name__ == "__main__":
    main()
