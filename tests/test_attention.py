"""The blocked attention: the same numbers as full attention, without the seq² tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qwen3emb.export.onnx.attention import AttentionSite, blocked_attention, shared_inputs

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _session(causal: bool, block: int) -> ort.InferenceSession:
    dims = ["batch", "heads", "seq", HEAD_DIM]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, dims),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, dims),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, dims)]
    if causal:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                    ["batch", "seq"]))
        nodes, inits, shared = shared_inputs("attention_mask", block)
    else:
        nodes, inits, shared = shared_inputs(None, block, seq_from="q")
    site = AttentionSite("q", "k", "v", "out", HEAD_DIM ** -0.5, causal, ())
    more, constants = blocked_attention(site, shared, heads=HEADS, kv_heads=KV_HEADS,
                                        head_dim=HEAD_DIM, prefix="attention/0")
    graph = helper.make_graph(nodes + more, "g", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)],
                              initializer=inits + constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _reference(q, k, v, mask, causal: bool) -> np.ndarray:
    """Full attention in float64 with the traced module's mask (real key or itself; causal)."""
    groups = HEADS // KV_HEADS
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = (q.astype(np.float64) @ k.transpose(0, 1, 3, 2)) * HEAD_DIM ** -0.5
    seq = q.shape[2]
    rows, cols = np.arange(seq)[:, None], np.arange(seq)[None, :]
    allowed = (mask[:, None, None, :] > 0) | (rows == cols)
    if causal:
        allowed = allowed & (cols <= rows)
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("seq", [1, 7, 8, 37])
def test_blocked_attention_equals_full_attention_for_any_padding(seq: int) -> None:
    """Blocks of 8 rows over 1..37 tokens, padded left, right, both sides or not at all."""
    rng = np.random.default_rng(seq)
    q = rng.standard_normal((4, HEADS, seq, HEAD_DIM), np.float32)
    k = rng.standard_normal((4, KV_HEADS, seq, HEAD_DIM), np.float32)
    v = rng.standard_normal((4, KV_HEADS, seq, HEAD_DIM), np.float32)
    mask = np.ones((4, seq), np.int64)
    mask[1, : seq // 2] = 0                  # left padding
    mask[2, seq - seq // 3:] = 0             # right padding
    mask[3, : seq // 4] = 0
    mask[3, seq - seq // 4:] = 0             # both sides
    out = _session(True, 8).run(None, {"q": q, "k": k, "v": v, "attention_mask": mask})[0]
    np.testing.assert_allclose(out, _reference(q, k, v, mask, True), atol=2e-6, rtol=0)


def test_blocked_attention_without_mask_is_bidirectional() -> None:
    """The vision tower's form: every key, no mask, rows split into blocks."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, n, 21, HEAD_DIM), np.float32)
               for n in (HEADS, KV_HEADS, KV_HEADS))
    out = _session(False, 8).run(None, {"q": q, "k": k, "v": v})[0]
    np.testing.assert_allclose(out, _reference(q, k, v, np.ones((3, 21)), False), atol=2e-6)


def test_a_row_never_depends_on_its_batch_mates() -> None:
    """A sequence alone and beside a longer one (so with other block counts) gives the same
    output for its rows, to the bit pattern of fp32 rounding (1e-6)."""
    rng = np.random.default_rng(2)
    session = _session(True, 8)
    q = rng.standard_normal((2, HEADS, 30, HEAD_DIM), np.float32)
    k = rng.standard_normal((2, KV_HEADS, 30, HEAD_DIM), np.float32)
    v = rng.standard_normal((2, KV_HEADS, 30, HEAD_DIM), np.float32)
    mask = np.ones((2, 30), np.int64)
    mask[1, 11:] = 0
    both = session.run(None, {"q": q, "k": k, "v": v, "attention_mask": mask})[0]
    alone = session.run(None, {"q": q[1:, :, :11], "k": k[1:, :, :11], "v": v[1:, :, :11],
                               "attention_mask": mask[1:, :11]})[0]
    np.testing.assert_allclose(both[1, :, :11], alone[0], atol=1e-6, rtol=0)


def test_exported_graphs_hold_no_sequence_squared_attention(tiny_bundle: Path) -> None:
    """Outside the loop bodies, the only Softmax left is the pooled layer's single row."""
    model = onnx.load(tiny_bundle / "onnx" / "model.onnx", load_external_data=False)
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    # 2 layers: the first is blocked, the second is the pooled layer (one query row).
    assert len(loops) == 1 and len(softmaxes) == 1
    body = loops[0].attribute[0].g
    assert [n.op_type for n in body.node].count("Softmax") == 1


def test_long_input_crosses_blocks_and_matches_the_reference(tiny_bundle: Path,
                                                             reference) -> None:
    """A 1000-token text (four 256-row blocks) embeds as the HF reference does, alone, beside
    a short text, and left-padded."""
    from qwen3emb.runtime import TextEmbedder

    embedder = TextEmbedder(tiny_bundle)
    long_text = " ".join(f"word{i % 97} and more" for i in range(400))
    ids = embedder.tokenize([long_text, "a short one"])
    assert len(ids[0]) > 3 * 256, len(ids[0])
    want = reference.embed([long_text, "a short one"], embedder.max_length)
    for side in ("left", "right"):
        input_ids, mask = embedder.pad(ids, side=side)
        got = embedder.run_ids(input_ids, mask)
        cosines = np.sum(got * want, axis=1)
        assert cosines.min() > 0.99999, (side, cosines)
    alone = embedder.encode([long_text])
    together = embedder.encode([long_text, "a short one"])
    assert np.abs(alone[0] - together[0]).max() < 1e-6
