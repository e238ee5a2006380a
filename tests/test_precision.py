"""Precision variants (fp16, int8, int4) stay faithful, including on planted outlier channels."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qwen3emb.convert.hard_checkpoints import compensate_norms

OUTLIER_CHANNELS = (5, 17, 40)
STEADY_CHANNEL = 0
OUTLIER_MAGNITUDE = 3000.0
FEATURE_GAIN = 20.0
TYPICAL_RMS = 0.03


def plant_outliers(model) -> None:
    """Give the residual stream a few channels of ~3000, as real Qwen3 checkpoints have.

    Layer 0's MLP turns a steady embedding channel into three huge residual channels (the
    way real models grow "massive activations"); their squares (~9e6) overflow fp16 inside
    every later RMSNorm. Later norms scale the ordinary channels back up (as trained models
    do) and give the huge channels a 20x gain that the projections absorb, so later MatMul
    inputs carry LLM.int8-style outlier features. The fp32 model stays finite and its
    embeddings stay distinct.
    """
    import torch

    hidden = model.config.hidden_size
    huge, steady = list(OUTLIER_CHANNELS), STEADY_CHANNEL
    rms = OUTLIER_MAGNITUDE * (len(huge) / hidden) ** 0.5  # the norms' rms after layer 0
    with torch.no_grad():
        model.embed_tokens.weight[:, steady] = 0.5
        mlp = model.layers[0].mlp
        for i, channel in enumerate(huge):
            mlp.gate_proj.weight[i] = 0
            mlp.gate_proj.weight[i, steady] = 1.3
            mlp.up_proj.weight[i] = 0
            mlp.up_proj.weight[i, steady] = 1.3
            mlp.down_proj.weight[:, i] = 0
            mlp.down_proj.weight[channel] = 0
            mlp.down_proj.weight[channel, i] = (-1) ** i * OUTLIER_MAGNITUDE / 95.0
    # Later norms as trained models have them (shared with the fidelity fixtures).
    compensate_norms(model, huge, rms, first_layer=1)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="qwen3emb-precision-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def outlier_checkpoint(workdir):
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint

    return build_random_checkpoint(workdir / "outlier-ckpt", preset="tiny", modify=plant_outliers,
                                   num_hidden_layers=3)


@pytest.fixture(scope="module")
def normal_checkpoint(workdir):
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint

    return build_random_checkpoint(workdir / "normal-ckpt", preset="tiny")


def _export(checkpoint, out, **kwargs):
    from qwen3emb.pipeline import export_bundle

    return export_bundle(checkpoint, out, precisions=["fp16", "int8", "int4"], force=True,
                         **kwargs)


@pytest.fixture(scope="module")
def outlier_bundle(outlier_checkpoint, workdir):
    return _export(outlier_checkpoint, workdir / "outlier-bundle")


@pytest.fixture(scope="module")
def normal_bundle(normal_checkpoint, workdir):
    return _export(normal_checkpoint, workdir / "normal-bundle")


@pytest.fixture(scope="module")
def reference(outlier_checkpoint):
    """fp32 HF embeddings of a few texts, and the texts."""
    from qwen3emb.validate.reference import ReferenceEmbedder

    texts = ["The quick brown fox jumps over the lazy dog.", "Hello", "東京は日本の首都です。",
             "def add(a, b):\n    return a + b", "Paris is the capital of France. " * 6]
    return texts, ReferenceEmbedder(outlier_checkpoint).embed(texts, 256)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.nan_to_num(a.astype(np.float64))
    return float(np.min((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)))


@pytest.mark.slow
def test_outlier_fixture_is_finite_in_fp32_and_exceeds_fp16_range(outlier_checkpoint):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(outlier_checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(0, 900, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    residual = out.hidden_states[1]
    assert torch.isfinite(out.last_hidden_state).all()
    assert residual.abs().max() > 2000  # several thousand in the residual stream
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(residual.abs().max().item()) ** 2)  # x^2 overflows fp16
    pooled = torch.nn.functional.normalize(out.last_hidden_state[:, -1], dim=-1)
    assert (pooled @ pooled.T).fill_diagonal_(0).max() < 0.95  # embeddings stay distinct


@pytest.mark.slow
@pytest.mark.parametrize("bundle_name", ["outlier_bundle", "normal_bundle"])
def test_every_precision_meets_its_floor(bundle_name, request):
    from qwen3emb.constants import FLOORS

    result = request.getfixturevalue(bundle_name)
    report = result.report
    by_precision = {a.precision: a for a in report.artifacts}
    assert sorted(by_precision) == ["fp16", "fp32", "int4", "int8"]
    for precision, artifact in by_precision.items():
        assert artifact.nan_inf == 0, precision
        assert artifact.min_cosine >= FLOORS[precision], (precision, artifact.failures)
    assert report.passed
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert set(manifest["parity"]["min_cosine"]) == {"fp32", "fp16", "int8", "int4"}


@pytest.mark.slow
def test_manifest_describes_each_precision(outlier_bundle):
    from qwen3emb.manifest import read_manifest

    manifest = read_manifest(outlier_bundle.bundle)
    models = manifest.models("onnx")
    assert models["fp16"]["path"] == "onnx/model_fp16.onnx"
    assert models["int8"]["path"] == "onnx/model_int8.onnx"
    assert models["int4"]["path"] == "onnx/model_int4.onnx"
    for precision, entry in models.items():
        assert entry["scheme"] and isinstance(entry["settings"], dict), precision
    assert models["int8"]["settings"]["scheme"] == "smoothquant"
    assert models["int4"]["settings"]["block_size"] == 128
    assert models["int4"]["settings"]["8bit_matmuls"] == ["v_proj/MatMul", "o_proj/MatMul",
                                                          "down_proj/MatMul"]
    assert not manifest.verify()
    sizes = {p: e["size"] for p, e in models.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    # Each variant's time against the fp32 graph, measured at export as the runtime runs it.
    from qwen3emb.runtime.kernels import int8_kernel

    for precision in ("fp16", "int8", "int4"):
        speed = models[precision]["settings"]["speed"]
        assert speed["ms"] > 0 and speed["fp32_ms"] > 0, precision
        assert speed["x_fp32"] == pytest.approx(speed["fp32_ms"] / speed["ms"], rel=0.01)
        assert speed["int8_kernel"] == int8_kernel() and speed["threads"] == 2
    # The parity report says what ran each artifact.
    report = (outlier_bundle.bundle / "reports" / "parity.md").read_text()
    assert "| checked on |" in report
    assert f"onnxruntime CPUExecutionProvider, int8 kernel {int8_kernel()}" in report


@pytest.mark.slow
def test_int4_keeps_v_o_down_projections_at_8_bits(outlier_bundle, workdir):
    """Fixed int4 recipe exactly; the searched one: v/o/down 8-bit, departures recorded."""
    import onnx

    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds
    from qwen3emb.export.quant.variants import build_variant
    from qwen3emb.manifest import read_manifest

    bundle = outlier_bundle.bundle
    source = bundle / "onnx" / "model.onnx"
    calibration = calibrate(source, calibration_feeds(bundle / "tokenizer.json"))
    fixed = build_variant(source, "int4", calibration=calibration, target=workdir / "i4.onnx")
    bits = {r: set(c) for r, c in _matmul_bits(onnx.load(str(fixed.path))).items()}
    assert {r: bits[r] for r in ("q_proj", "k_proj", "gate_proj", "up_proj")} == {
        r: {"4-bit"} for r in ("q_proj", "k_proj", "gate_proj", "up_proj")}
    assert all(bits[r] == {"8-bit"} for r in ("v_proj", "o_proj", "down_proj")), bits
    counts = _matmul_bits(onnx.load(str(bundle / "onnx" / "model_int4.onnx")))
    assert all(counts[r]["4-bit"] == 0 for r in ("v_proj", "o_proj", "down_proj"))
    settings = read_manifest(bundle).models("onnx")["int4"]["settings"]
    departed = sum(n for r in ("q_proj", "k_proj", "gate_proj", "up_proj")
                   for kind, n in counts[r].items() if kind != "4-bit")
    assert departed == sum(c.startswith("int4->") for c in settings["escalated"].values())


def _matmul_bits(model) -> dict:
    """Role → Counter of the treatments of its weight MatMuls."""
    found: dict = {}
    for node in model.graph.node:
        role = next((r for r in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj") if f".{r}/" in node.name), None)
        if node.op_type == "MatMulNBits":
            kind = f"{next(a.i for a in node.attribute if a.name == 'bits')}-bit"
        elif node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            kind = "8-bit"
        else:
            kind = "fp32" if node.op_type == "MatMul" else None
        if role is not None and kind is not None:
            found.setdefault(role, Counter())[kind] += 1
    return found


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_runtime_loads_each_precision(outlier_bundle, reference, precision):
    from qwen3emb.constants import FLOORS
    from qwen3emb.runtime import TextEmbedder

    texts, expected = reference
    embedder = TextEmbedder(outlier_bundle.bundle, precision=precision, threads=2)
    vectors = embedder.encode(texts)
    assert np.isfinite(vectors).all()
    assert _min_cosine(vectors, expected) >= FLOORS[precision]


def test_int8_runs_the_same_on_either_integer_kernel(outlier_bundle, reference, monkeypatch):
    """The runtime's uint8 x int8 copy (VNNI CPUs) gives what the bundle's own uint8 x uint8
    file gives: the same integer products."""
    from qwen3emb.runtime import TextEmbedder, kernels

    texts, _ = reference
    outputs = {}
    for kernel in kernels.KERNELS:
        monkeypatch.setenv(kernels.KERNEL_ENV, kernel)
        embedder = TextEmbedder(outlier_bundle.bundle, precision="int8", threads=2)
        outputs[kernel] = embedder.encode(texts)
    if kernels.cpu_has_vnni():
        np.testing.assert_allclose(outputs["u8s8"], outputs["u8u8"], rtol=0, atol=1e-5)
    monkeypatch.delenv(kernels.KERNEL_ENV)
    assert kernels.int8_kernel() == ("u8s8" if kernels.cpu_has_vnni() else "u8u8")


@pytest.mark.slow
def test_fp16_keeps_norms_and_residual_in_fp32(outlier_bundle):
    import onnx

    model = onnx.load(str(outlier_bundle.bundle / "onnx" / "model_fp16.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    fp32_casts = {n.output[0] for n in model.graph.node if n.op_type == "Cast"
                  and next(a.i for a in n.attribute if a.name == "to") == onnx.TensorProto.FLOAT}
    norms = [n for n in model.graph.node if n.op_type.endswith("SimplifiedLayerNormalization")]
    assert len(norms) == 3 * 4 + 1, "the optimizer should have fused every RMSNorm"
    for node in norms:  # every input of every norm (the residual included) arrives in fp32
        for name in node.input:
            assert types.get(name) == onnx.TensorProto.FLOAT or name in fp32_casts, name
    matmul_weights = [types[n.input[1]] for n in model.graph.node
                      if n.op_type == "MatMul" and n.input[1] in types]
    assert matmul_weights and set(matmul_weights) == {onnx.TensorProto.FLOAT16}


@pytest.mark.slow
def test_naive_fp16_overflows_on_outliers(outlier_bundle, reference):
    """The exporter's graph cast wholesale to fp16, evaluated with true fp16 arithmetic.

    onnxruntime's CPU provider silently upcasts most fp16 ops, so the fp16 arithmetic of an
    accelerator is reproduced with onnx's reference evaluator instead.
    """
    import onnx
    from onnx.reference import ReferenceEvaluator

    from qwen3emb.export.quant.fp16 import convert_fp16
    from qwen3emb.runtime import TextEmbedder

    texts, expected = reference
    fp32 = onnx.load(str(outlier_bundle.bundle / "onnx" / "model.onnx"))
    plain = _unfuse_norms(fp32)
    naive = convert_fp16(plain, keep_fp32_ops=())
    embedder = TextEmbedder(outlier_bundle.bundle, threads=1)
    ids, mask = embedder.pad(embedder.tokenize(texts[:2]))
    feeds = {"input_ids": ids, "attention_mask": mask}
    with np.errstate(all="ignore"):
        fused_ok = ReferenceEvaluator(plain).run(None, feeds)[0]
        broken = ReferenceEvaluator(naive).run(None, feeds)[0]
    assert _min_cosine(fused_ok, expected[:2]) > 0.9999  # the evaluator itself is faithful
    assert not np.isfinite(broken).all() or _min_cosine(broken, expected[:2]) < 0.999


def _unfuse_norms(model):
    """Rewrite (Skip)SimplifiedLayerNormalization back into plain ONNX ops (Pow, ReduceMean...)."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    out.graph.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), "_two"),
                                  numpy_helper.from_array(np.array([-1], np.int64), "_axes")])
    for i, node in enumerate(out.graph.node):
        if not node.op_type.endswith("SimplifiedLayerNormalization"):
            nodes.append(node)
            continue
        eps = next(a.f for a in node.attribute if a.name == "epsilon")
        p = f"_n{i}"
        out.graph.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), p + "eps"))
        if node.op_type.startswith("Skip"):
            x, weight = p + "sum", node.input[2]
            nodes.append(helper.make_node("Add", node.input[:2], [x]))
            if len(node.output) > 3 and node.output[3]:
                nodes.append(helper.make_node("Identity", [x], [node.output[3]]))
        else:
            x, weight = node.input[0], node.input[1]
        nodes += [helper.make_node("Pow", [x, "_two"], [p + "sq"]),
                  helper.make_node("ReduceMean", [p + "sq", "_axes"], [p + "mean"]),
                  helper.make_node("Add", [p + "mean", p + "eps"], [p + "var"]),
                  helper.make_node("Sqrt", [p + "var"], [p + "std"]),
                  helper.make_node("Reciprocal", [p + "std"], [p + "inv"]),
                  helper.make_node("Mul", [x, p + "inv"], [p + "normed"]),
                  helper.make_node("Mul", [p + "normed", weight], [node.output[0]])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.opset_import[:]
    out.opset_import.append(helper.make_opsetid("", 18))
    return out


@pytest.mark.slow
def test_naive_int8_fails_on_outliers_but_not_the_default(outlier_bundle, reference, workdir):
    from qwen3emb.constants import FLOORS
    from qwen3emb.export.quant.quantize import NAIVE_INT8_SCHEME
    from qwen3emb.runtime import TextEmbedder

    texts, expected = reference
    naive, settings = _int8(outlier_bundle.bundle, NAIVE_INT8_SCHEME, workdir)
    assert settings["fp32_matmuls"] == [] and settings["per_channel"] is False
    naive_out = _run_model(naive, outlier_bundle.bundle, texts)
    default_out = TextEmbedder(outlier_bundle.bundle, precision="int8", threads=1).encode(texts)
    assert _min_cosine(naive_out, expected) < FLOORS["int8"]
    assert _min_cosine(default_out, expected) >= FLOORS["int8"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["dynamic", "nbits8", "mixed"])
def test_other_int8_schemes_stay_selectable_and_faithful(outlier_bundle, reference, workdir,
                                                         scheme):
    from qwen3emb.constants import FLOORS

    texts, expected = reference
    variant, settings = _int8(outlier_bundle.bundle, scheme, workdir)
    assert settings["scheme"] == scheme
    got = _min_cosine(_run_model(variant, outlier_bundle.bundle, texts), expected)
    assert got >= FLOORS["int8"]


def _int8(bundle, scheme, workdir):
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.precisions import calibration_feeds
    from qwen3emb.export.quant.variants import build_variant

    source = bundle / "onnx" / "model.onnx"
    calibration = calibrate(source, calibration_feeds(bundle / "tokenizer.json"))
    variant = build_variant(source, "int8", calibration=calibration, int8_scheme=scheme,
                            target=workdir / f"int8-{scheme}.onnx")
    return variant.path, variant.settings


def _run_model(path, bundle, texts, max_length=256):
    """Embed ``texts`` one at a time with the graph at ``path`` and the bundle's tokenizer."""
    import onnxruntime as ort

    from qwen3emb.runtime import TextEmbedder

    embedder = TextEmbedder(bundle, threads=1, max_length=max_length)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = []
    for ids in embedder.tokenize(texts):
        input_ids, mask = embedder.pad([ids])
        rows.append(session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0])
    return np.concatenate(rows)


def test_unknown_precision_is_rejected_with_the_supported_values():
    from qwen3emb.errors import InputError
    from qwen3emb.export.quant.precisions import check_precisions

    with pytest.raises(InputError) as info:
        check_precisions(["fp32", "int3"])
    assert "unknown precision 'int3'" in info.value.message
    assert "fp32, fp16, int8, int4" in info.value.hint


def test_unknown_int8_scheme_is_rejected_with_the_supported_values():
    from qwen3emb.errors import InputError
    from qwen3emb.export.quant.precisions import check_precisions

    with pytest.raises(InputError) as info:
        check_precisions(["int8"], int8_scheme="awq")
    assert info.value.one_line() == (
        "unknown int8 scheme 'awq'. Supported: dynamic, smoothquant, nbits8, mixed")


def test_precisions_always_start_with_fp32_in_a_fixed_order():
    from qwen3emb.export.quant.precisions import check_precisions

    assert check_precisions(None) == ["fp32"]
    assert check_precisions(["int4", "fp16", "int4"]) == ["fp32", "fp16", "int4"]


def test_search_targets_parse_and_reject_what_the_search_cannot_aim():
    from qwen3emb.errors import InputError
    from qwen3emb.export.quant.precisions import check_targets

    wanted = ["fp32", "int8", "int4"]
    assert check_targets(["int8=0.9994", "INT4=0.97"], wanted) == {"int8": 0.9994,
                                                                   "int4": 0.97}
    assert check_targets(None, wanted) == {}
    for bad, words in [("int8", "is not PRECISION=COSINE"), ("fp16=0.999", "is not"),
                       ("int8=high", "is not"), ("int8=0.98", "outside [0.99, 1)"),
                       ("int4=1.0", "outside [0.95, 1)")]:
        with pytest.raises(InputError) as info:
            check_targets([bad], wanted)
        assert words in info.value.message, bad
        assert "\n" not in info.value.one_line()
    with pytest.raises(InputError) as info:
        check_targets(["int4=0.97"], ["fp32", "int8"])
    assert "not exported" in info.value.message and "--precision int4" in info.value.hint
    with pytest.raises(InputError) as info:
        check_targets(["int8=0.999"], wanted, int8_scheme="dynamic")
    assert "--int8-scheme" in info.value.message


def test_cli_rejects_a_target_outside_the_floor_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from qwen3emb.cli.app import create_app

    result = CliRunner().invoke(create_app(), ["export", str(tmp_path / "missing"), "-o",
                                               str(tmp_path / "out"), "--precision", "int8",
                                               "--target", "int8=0.5"])
    assert result.exit_code == 2
    assert "--target 'int8=0.5' is outside [0.99, 1)" in result.output
    assert not (tmp_path / "out").exists()


def test_export_records_the_target_it_aimed_for(tiny_checkpoint, tmp_path):
    from qwen3emb.pipeline import export_bundle

    result = export_bundle(tiny_checkpoint, tmp_path / "aimed", validate=False,
                           precisions=["int8"], targets=["int8=0.9995"])
    settings = next(a["settings"] for a in result.manifest["artifacts"]
                    if a.get("role") == "model" and a["precision"] == "int8")
    assert settings["target"] == 0.9995
    assert settings["target_reached"] == (settings["calibration_fidelity"] >= 0.9995)


def test_cli_rejects_an_unknown_int8_scheme(tmp_path):
    from typer.testing import CliRunner

    from qwen3emb.cli.app import create_app

    result = CliRunner().invoke(create_app(), ["export", str(tmp_path / "missing"), "-o",
                                               str(tmp_path / "out"), "--precision", "int8",
                                               "--int8-scheme", "bogus"])
    assert result.exit_code == 2
    assert "unknown int8 scheme 'bogus'" in result.output
