"""Qwen3-VL precision variants: fp16 / int8 / int4 decoders and the fp16 vision graph stay
faithful on every probe kind, on a VL checkpoint with planted outlier channels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_precision import OUTLIER_CHANNELS, STEADY_CHANNEL, plant_outliers
from typer.testing import CliRunner

from qwen3emb.cli import create_app
from qwen3emb.constants import FLOORS
from qwen3emb.validate.vl_probes import synthetic_image, write_test_video

runner = CliRunner()
VISION_OUTLIERS = (3, 11)
VISION_MAGNITUDE = 400.0
KINDS = {"text", "empty", "image", "video", "image+text", "video+image+text"}


def plant_vl_outliers(model) -> None:
    """Outlier channels in both towers, consistent with the activations they meet.

    Decoder: the text fixture's residual channels of ~3000 (see test_precision.py), grown
    from a steady embedding channel; the vision merger emits that steady channel too, so
    visual tokens grow the same outliers as text tokens (as trained models' tokens do).
    Vision: two residual channels of ±400 from the patch embedding bias (x^2 = 1.6e5 overflows
    fp16 inside every LayerNorm); the LayerNorm weights scale the ordinary channels back up and
    damp the huge ones, so the fp32 tower computes what it did, by another route.
    """
    import torch

    plant_outliers(model.language_model)
    visual = model.visual
    hidden = visual.config.hidden_size
    huge = torch.tensor(VISION_OUTLIERS)
    probe = torch.randn(64, visual.patch_embed.proj.weight[0].numel(),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merger = visual.merger.linear_fc2
        merger.weight[STEADY_CHANNEL] = 0
        merger.bias[STEADY_CHANNEL] = 0.5
        before = visual.patch_embed(probe).std(-1).mean()
        for i, channel in enumerate(VISION_OUTLIERS):
            visual.patch_embed.proj.bias[channel] = (-1) ** i * VISION_MAGNITUDE
        gain = visual.patch_embed(probe).std(-1).mean() / before
        norms = [n for block in visual.blocks for n in (block.norm1, block.norm2)]
        norms += [visual.merger.norm, *(m.norm for m in visual.deepstack_merger_list)]
        for norm in norms:  # deepstack mergers normalize 2x2 merged patches (4 * hidden)
            outlier = torch.isin(torch.arange(norm.weight.shape[0]) % hidden, huge)
            norm.weight[~outlier] *= gain
            norm.weight[outlier] = 0.01


@pytest.fixture(scope="module")
def outlier_vl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen3emb.convert.random_vl_checkpoint import build_random_vl_checkpoint

    return build_random_vl_checkpoint(tmp_path_factory.mktemp("vl-outliers") / "ckpt",
                                      modify=plant_vl_outliers)


@pytest.fixture(scope="module")
def vl_precision_bundle(outlier_vl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """Every precision, exported and validated."""
    from qwen3emb.pipeline import export_bundle

    out = tmp_path_factory.mktemp("vl-precision") / "bundle"
    return export_bundle(outlier_vl_checkpoint, out, precisions=["fp16", "int8", "int4"])


@pytest.mark.slow
def test_outlier_fixture_reaches_visual_tokens_and_overflows_fp16(outlier_vl_checkpoint):
    import torch
    from transformers import Qwen3VLModel

    from qwen3emb.validate.vl_reference import ReferenceVLEmbedder

    model = Qwen3VLModel.from_pretrained(outlier_vl_checkpoint, dtype=torch.float32).eval()
    ref = ReferenceVLEmbedder(outlier_vl_checkpoint, model=model)
    inputs = ref.inputs({"image": synthetic_image(96, 64, seed=3), "text": "x"}, None)
    visual = (inputs["input_ids"][0] == 151655)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        patches = model.visual.patch_embed(inputs["pixel_values"])
    residual = out.hidden_states[1][0]
    assert residual[visual][:, list(OUTLIER_CHANNELS)].abs().min() > 1000
    assert residual[~visual][:, list(OUTLIER_CHANNELS)].abs().min() > 1000
    assert patches[:, list(VISION_OUTLIERS)].abs().min() > 300  # squares overflow fp16
    assert torch.isfinite(out.last_hidden_state).all()


@pytest.mark.slow
def test_every_vl_precision_meets_its_floor_on_every_probe_kind(vl_precision_bundle) -> None:
    report = vl_precision_bundle.report
    assert report.passed, [(a.artifact, a.failures) for a in report.artifacts]
    by_path = {a.artifact: a for a in report.artifacts}
    assert list(by_path) == ["onnx/decoder.onnx", "onnx/decoder_fp16.onnx",
                             "onnx/decoder_int8.onnx", "onnx/decoder_int4.onnx",
                             "onnx/vision.onnx", "onnx/vision_fp16.onnx",
                             "onnx/vision_int8.onnx", "onnx/vision_int4.onnx"]
    for path, artifact in by_path.items():
        assert artifact.nan_inf == 0, path
        assert artifact.floor == FLOORS[artifact.precision]
        kinds: dict[str, float] = {}
        for key, cosine in artifact.cosines.items():
            kinds[key.split(":")[1]] = min(kinds.get(key.split(":")[1], 1.0), cosine)
        print(path, {k: round(v, 6) for k, v in sorted(kinds.items())})
        if "decoder" in path:
            assert KINDS <= set(kinds), (path, kinds)
            assert any(k.startswith("batch:") for k in artifact.cosines)
        else:
            assert {"image", "image-tiny", "video-frames", "video-file"} <= set(kinds)
        assert min(kinds.values()) >= FLOORS[artifact.precision], (path, kinds)
    assert "vision_fp16.onnx" in (by_path["onnx/decoder_fp16.onnx"].note or "")
    assert "vision_int8.onnx" in (by_path["onnx/decoder_int8.onnx"].note or "")
    assert "vision_int4.onnx" in (by_path["onnx/decoder_int4.onnx"].note or "")
    manifest = vl_precision_bundle.manifest
    assert set(manifest["parity"]["min_cosine"]) == set(by_path)


@pytest.mark.slow
def test_manifest_describes_each_graph_precision_and_its_vision_pair(vl_precision_bundle):
    from qwen3emb.manifest import read_manifest

    manifest = read_manifest(vl_precision_bundle.bundle)
    assert not manifest.verify()
    onnx = [a for a in manifest.artifacts if a["kind"] == "onnx"]
    decoders = {a["precision"]: a for a in onnx if a.get("graph") == "decoder"}
    visions = {a["precision"]: a for a in onnx if a.get("graph") == "vision"}
    assert {p: a["path"] for p, a in decoders.items()} == {
        "fp32": "onnx/decoder.onnx", "fp16": "onnx/decoder_fp16.onnx",
        "int8": "onnx/decoder_int8.onnx", "int4": "onnx/decoder_int4.onnx"}
    assert {p: a["path"] for p, a in visions.items()} == {
        "fp32": "onnx/vision.onnx", "fp16": "onnx/vision_fp16.onnx",
        "int8": "onnx/vision_int8.onnx", "int4": "onnx/vision_int4.onnx"}
    assert {p: a["vision_precision"] for p, a in decoders.items()} == {
        "fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int4"}
    for entry in [*decoders.values(), *visions.values()]:
        assert entry["scheme"] and isinstance(entry["settings"], dict), entry["path"]
    for precision in ("int8", "int4"):
        for entry in (decoders[precision], visions[precision]):
            settings = entry["settings"]
            assert settings["search"].startswith("accuracy-driven"), entry["path"]
            assert settings["calibration_fidelity"] >= FLOORS[precision], entry["path"]
            assert settings["batch_independent"] is True, entry["path"]
    tiers = [tier for tier, _ in decoders["int8"]["settings"]["matmuls"].values()]
    assert tiers.count("int8-row") > len(tiers) / 2  # o_proj/down_proj too, unlike `mixed`
    assert decoders["fp32"]["settings"]["fusions"]["skip_norms"] > 0  # text fusions apply
    assert decoders["fp16"]["settings"]["fp32_residual_adds"] == 3  # the deepstack layers
    assert visions["fp16"]["settings"]["fp32_residual_adds"] > 0
    assert set(manifest.models("onnx")) == {"fp32", "fp16", "int8", "int4"}
    size = {a["path"]: a["size"] for a in onnx}
    assert size["onnx/decoder_int4.onnx"] <= size["onnx/decoder_int8.onnx"] \
        < size["onnx/decoder_fp16.onnx"] < size["onnx/decoder.onnx"]
    # The tiny tower's weights (K = 32..256) weigh less than its graph's nodes, so the
    # quantized visions only compare with fp32 here.
    assert max(size[f"onnx/vision_{p}.onnx"] for p in ("fp16", "int8", "int4")) \
        < size["onnx/vision.onnx"]



@pytest.mark.slow
def test_vl_decoder_calibrates_piecewise_on_all_its_inputs(vl_precision_bundle):
    """The streamed calibration carries every decoder input (position ids, visual rows,
    deepstack maps) across its cuts and gets the ranges of one whole-graph run."""
    import onnx

    from qwen3emb.export.quant.calibrate import calibrate, split_graph
    from qwen3emb.export.quant.vl_calibration import vl_calibration_feeds
    from qwen3emb.manifest import read_manifest
    from qwen3emb.runtime.vl import choose_graphs

    manifest = read_manifest(vl_precision_bundle.bundle)
    feeds = vl_calibration_feeds(manifest, choose_graphs(manifest, "fp32")[1])
    assert any(f["visual_embeds"].shape[0] > 0 for f in feeds)
    source = vl_precision_bundle.bundle / "onnx" / "decoder.onnx"
    chunk = 1 << 16  # a few MatMul weights per piece; the embedding table gets its own
    pieces = split_graph(onnx.load(str(source), load_external_data=False), chunk)
    later = {name for piece in pieces[1:] for node in piece for name in node.input}
    assert {"position_ids", "deepstack_embeds", "attention_mask"} <= later
    whole = calibrate(source, feeds)
    cut = calibrate(source, feeds, chunk_bytes=chunk)
    assert whole.pieces == 1 and cut.pieces == len(pieces) >= 4
    assert set(cut.ranges) == set(whole.ranges)
    for name, peak in whole.ranges.items():
        np.testing.assert_allclose(cut.ranges[name], peak, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_int8_decoder_rows_never_meet_so_a_mixed_batch_changes_nothing(vl_precision_bundle):
    """The searched int8 decoder quantizes activations per row: its graph has no dynamic
    (per-call) quantization, and texts and images embedded alone or in one batch agree."""
    from collections import Counter

    import onnx

    from qwen3emb.manifest import read_manifest
    from qwen3emb.runtime.vl import VLEmbedder

    manifest = read_manifest(vl_precision_bundle.bundle)
    entry = next(a for a in manifest.artifacts
                 if a.get("graph") == "decoder" and a["precision"] == "int8")
    tiers = Counter(tier for tier, _ in entry["settings"]["matmuls"].values())
    ops = Counter(n.op_type for n in onnx.load(str(vl_precision_bundle.bundle
                                                   / entry["path"])).graph.node)
    assert ops["DynamicQuantizeLinear"] == 0
    assert ops["MatMulIntegerToFloat"] == tiers["int8-row"] > 0
    items = [{"text": "a red square"}, {"image": synthetic_image(64, 48, seed=1)},
             {"image": synthetic_image(96, 64, seed=2), "text": "what is it"},
             {"text": "a much longer text about rivers and banks " * 6}]
    embedder = VLEmbedder(vl_precision_bundle.bundle, precision="int8")
    alone = np.concatenate([embedder.encode([item]) for item in items])
    batched = embedder.encode(items, batch_size=len(items))
    np.testing.assert_allclose(batched, alone, atol=1e-6)


@pytest.mark.slow
def test_fp16_vision_keeps_norms_softmax_and_residual_in_fp32(vl_precision_bundle):
    import onnx

    model = onnx.load(str(vl_precision_bundle.bundle / "onnx" / "vision_fp16.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    fp32 = {n.output[0] for n in model.graph.node if n.op_type == "Cast"
            and next(a.i for a in n.attribute if a.name == "to") == onnx.TensorProto.FLOAT}
    fp32 |= {i.name for i in model.graph.input}
    kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len([n for n in kept if n.op_type == "LayerNormalization"]) == 12
    for node in kept:
        for name in node.input:
            assert types.get(name) == onnx.TensorProto.FLOAT or name in fp32, (node.name, name)
    weights = {types[n.input[1]] for n in model.graph.node
               if n.op_type == "MatMul" and n.input[1] in types}
    assert weights == {onnx.TensorProto.FLOAT16}


def _true_fp16(model, contrib_ops: bool = True):
    """onnx's reference evaluator for ``model``: numpy arithmetic in each tensor's own dtype,
    as an accelerator computes fp16 (onnxruntime's CPU provider upcasts most fp16 ops)."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from qwen3emb.export.onnx.graph import topological

    def rms(x, scale, epsilon):
        return x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + x.dtype.type(epsilon)) \
            * scale

    class SimplifiedLayerNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, axis=-1, epsilon=1e-6, stash_type=1):
            return (rms(x, scale, epsilon).astype(x.dtype),)

    class SkipSimplifiedLayerNormalization(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, skip, scale, epsilon=1e-6):
            total = x + skip
            empty = np.zeros(0, total.dtype)
            return rms(total, scale, epsilon).astype(total.dtype), empty, empty, total

    class FastGelu(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x):
            c = x.dtype.type(np.sqrt(2 / np.pi))
            inner = c * (x + x.dtype.type(0.044715) * x * x * x)
            return (x.dtype.type(0.5) * x * (x.dtype.type(1) + np.tanh(inner)),)

    class Gelu(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, approximate=None):  # the evaluator passes ONNX Gelu's attribute
            from scipy.special import erf

            half = x.dtype.type(0.5)
            return ((half * x * (1 + erf(x / x.dtype.type(np.sqrt(2))))).astype(x.dtype),)

    nodes = topological(model.graph, list(model.graph.node))  # the converter appends Casts
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    ops = [SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, FastGelu, Gelu]
    return ReferenceEvaluator(model, new_ops=ops if contrib_ops else None)


def _cosine(a, b) -> float:
    a, b = (np.concatenate([np.ravel(x) for x in v]).astype(np.float64) for v in (a, b))
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@pytest.mark.slow
def test_fp16_vl_graphs_hold_in_true_fp16_where_naive_fp16_breaks(vl_precision_bundle):
    """Both fp16 graphs, and their naive casts, evaluated with real fp16 arithmetic."""
    import onnx
    from test_precision import _unfuse_norms

    from qwen3emb.export.quant.fp16 import convert_fp16
    from qwen3emb.runtime import VLEmbedder
    from qwen3emb.runtime.vl_vision import vision_tables

    bundle = vl_precision_bundle.bundle
    embedder = VLEmbedder(bundle, threads=1)
    item = embedder.prepare({"image": synthetic_image(96, 64, seed=3), "text": "x"}, 0,
                            "Represent the user's input.")
    visual = item.visuals[0]
    tables = vision_tables(visual.grid[1], visual.grid[2], embedder.geometry)
    vision_feeds = dict(zip(("pixel_patches", "pos_embed_indices", "pos_embed_weights",
                             "vision_position_ids"), (visual.patches.astype(np.float32), *tables)))
    decoder_feeds = embedder.decoder_inputs([item], embedder.encode_visuals([item]))
    graphs = {name: onnx.load(str(bundle / "onnx" / f"{name}.onnx"))
              for name in ("vision", "vision_fp16", "decoder", "decoder_fp16")}
    expected = {"vision": embedder.vision.run(None, vision_feeds),
                "decoder": embedder.decoder.run(None, decoder_feeds)}
    feeds = {"vision": vision_feeds, "decoder": decoder_feeds}
    with np.errstate(all="ignore"):
        for graph in ("vision", "decoder"):
            ours = _true_fp16(graphs[f"{graph}_fp16"]).run(None, feeds[graph])
            assert all(np.isfinite(x).all() for x in ours), graph
            assert _cosine(ours, expected[graph]) >= FLOORS["fp16"], graph
            plain = graphs[graph] if graph == "vision" else _unfuse_norms(graphs[graph])
            naive = _true_fp16(convert_fp16(plain, keep_fp32_ops=()),
                               graph == "vision").run(None, feeds[graph])
            print(graph, "ours", _cosine(ours, expected[graph]), "naive",
                  _cosine(naive, expected[graph]))
            assert _cosine(naive, expected[graph]) < FLOORS["fp16"], graph


@pytest.fixture(scope="module")
def reference_items(outlier_vl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A text, an image, a video file and a text+image, with their fp32 HF embeddings."""
    from qwen3emb.validate.vl_reference import ReferenceVLEmbedder

    video = str(write_test_video(tmp_path_factory.mktemp("vl-video") / "clip.mp4"))
    items = [{"text": "a red sofa"}, {"image": synthetic_image(200, 120, seed=21)},
             {"video": video}, {"text": "caption", "image": synthetic_image(64, 96, seed=22)}]
    reference = ReferenceVLEmbedder(outlier_vl_checkpoint)
    return items, np.stack([reference.embed(item) for item in items])


@pytest.mark.slow
@pytest.mark.parametrize("precision,vision", [("fp16", "fp16"), ("int8", "int8"),
                                              ("int4", "int4")])
def test_runtime_loads_each_vl_precision(vl_precision_bundle, reference_items, precision: str,
                                         vision: str) -> None:
    from qwen3emb.runtime import VLEmbedder

    items, expected = reference_items
    embedder = VLEmbedder(vl_precision_bundle.bundle, precision=precision, threads=2)
    assert (embedder.precision, embedder.vision_precision) == (precision, vision)
    vectors = embedder.encode(items)
    assert np.isfinite(vectors).all()
    assert float(np.min((vectors * expected).sum(1))) >= FLOORS[precision]
    if precision == "int8":  # the pairing is a default, not a constraint
        other = VLEmbedder(vl_precision_bundle.bundle, precision="int8", vision_precision="fp16")
        assert other.vision_precision == "fp16"
        assert float(np.min((other.encode(items) * expected).sum(1))) >= FLOORS["int8"]


@pytest.mark.slow
def test_cli_embeds_and_validates_by_precision(vl_precision_bundle, outlier_vl_checkpoint,
                                               tmp_path: Path) -> None:
    app = create_app()
    image = tmp_path / "cat.png"
    synthetic_image(90, 70).save(image)
    bundle = str(vl_precision_bundle.bundle)
    rows = {}
    for precision in ("fp32", "int8"):
        result = runner.invoke(app, ["embed", bundle, "--image", str(image), "--text", "a cat",
                                     "--precision", precision])
        assert result.exit_code == 0, result.output
        rows[precision] = np.array(json.loads(result.stdout)["embedding"])
    assert float(rows["fp32"] @ rows["int8"]) >= FLOORS["int8"]
    result = runner.invoke(app, ["validate", bundle, "-r", str(outlier_vl_checkpoint),
                                 "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    assert "decoder_fp16.onnx" in result.output and "vision_fp16.onnx" in result.output
    assert "decoder_int8.onnx" not in result.output and "decoder.onnx " not in result.output


def test_unknown_precision_on_a_vl_checkpoint_exits_2(vl_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    result = runner.invoke(create_app(), ["export", str(vl_checkpoint), "-o",
                                          str(tmp_path / "out"), "--precision", "int3"])
    assert result.exit_code == 2
    assert "unknown precision 'int3'" in result.stderr
    assert "Supported: fp32, fp16, int8, int4" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_precision_the_vl_bundle_lacks_exits_2(vl_bundle: Path, vl_checkpoint: Path) -> None:
    from qwen3emb.errors import InputError
    from qwen3emb.runtime import VLEmbedder

    result = runner.invoke(create_app(), ["embed", str(vl_bundle), "x", "--precision", "int8"])
    assert result.exit_code == 2
    assert "bundle has no 'int8' ONNX decoder. Available precisions: fp32" in result.stderr
    with pytest.raises(InputError, match="no 'fp16' ONNX vision graph"):
        VLEmbedder(vl_bundle, vision_precision="fp16")
    result = runner.invoke(create_app(), ["validate", str(vl_bundle), "-r", str(vl_checkpoint),
                                          "--precision", "int4"])
    assert result.exit_code == 2
    assert "bundle has no model of precision ['int4']" in result.stderr


@pytest.mark.slow
def test_int8_vision_graph_is_searched_and_records_its_decisions(vl_precision_bundle):
    """The int8 vision graph comes from the accuracy-driven search: every weight MatMul of the
    tower (blocks and patch mergers) has a recorded tier and measured error, and the graph
    holds exactly that many int8 MatMuls; the position table stays fp32."""
    from collections import Counter

    import onnx

    from qwen3emb.export.quant.scoring import TARGETS
    from qwen3emb.manifest import read_manifest

    bundle = vl_precision_bundle.bundle
    manifest = read_manifest(bundle)
    entries = {(a.get("graph"), a["precision"]): a for a in manifest.artifacts
               if a.get("kind") == "onnx" and a.get("role") != "external-data"}
    entry = entries["vision", "int8"]
    settings = entry["settings"]
    assert settings["search"].startswith("accuracy-driven")
    assert settings["scheme"] == "dynamic"
    assert settings["calibration_fidelity"] >= TARGETS["int8"] > FLOORS["int8"]
    assert settings["rounds"] and settings["rounds"][-1]["calibration_min_cosine"] > 0
    assert settings["embedding"] == {"treatment": "none (no token-embedding table)"}
    fp32 = onnx.load(str(bundle / "onnx" / "vision.onnx"))
    assert not [n for n in fp32.graph.node if n.op_type == "Gemm"]  # mergers are MatMuls
    weights = {t.name for t in fp32.graph.initializer}
    matmuls = {n.name for n in fp32.graph.node
               if n.op_type == "MatMul" and n.input[1] in weights}
    assert set(settings["matmuls"]) == matmuls
    assert any(".merger.linear_fc1/" in m for m in matmuls)
    assert any("deepstack_merger_list.2.linear_fc2/" in m for m in matmuls)
    tiers = Counter(tier for tier, _ in settings["matmuls"].values())
    model = onnx.load(str(bundle / entry["path"]))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulIntegerToFloat"] == tiers["int8-row"] > 0
    assert ops["DynamicQuantizeLinear"] == 0  # per-row: no image depends on another
    kept = {t.name: t.data_type for t in model.graph.initializer}
    assert kept["visual.pos_embed.weight"] == onnx.TensorProto.FLOAT
    assert entries["decoder", "int8"]["vision_precision"] == "int8"
    assert entries["decoder", "int4"]["vision_precision"] == "int4"
    int4 = entries["vision", "int4"]["settings"]
    assert int4["calibration_fidelity"] >= FLOORS["int4"] and int4["matmuls"]


@pytest.mark.slow
def test_vision_search_escalates_what_misses_its_target(vl_precision_bundle, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """With a target the plain int8 plan cannot meet, the search moves the most sensitive
    vision MatMuls up a tier, scores again against the fp32 vision outputs, and records it."""
    import shutil

    from qwen3emb.export.quant import scoring, search
    from qwen3emb.export.quant.calibrate import calibrate
    from qwen3emb.export.quant.sensitivity import ActivationSamples
    from qwen3emb.export.quant.vl_calibration import vision_calibration_feeds
    from qwen3emb.manifest import read_manifest

    manifest = read_manifest(vl_precision_bundle.bundle)
    source = tmp_path / "vision.onnx"
    shutil.copy(vl_precision_bundle.bundle / "onnx" / "vision.onnx", source)
    feeds = vision_calibration_feeds(manifest)
    samples = ActivationSamples()
    calibration = calibrate(source, feeds, observe=samples.observe)
    monkeypatch.setitem(scoring.TARGETS, "int8", 0.999999)
    [variant] = search.search_variants(source, ["int8"], scheme="dynamic",
                                       calibration=calibration, samples=samples, feeds=feeds)
    settings = variant.settings
    assert len(settings["rounds"]) >= 2
    assert settings["escalated"] and all(v.startswith("int8-row->")
                                         for v in settings["escalated"].values())
    first = settings["rounds"][0]["calibration_min_cosine"]
    assert settings["calibration_fidelity"] > first


def test_vision_calibration_images_are_not_the_validator_probes(vl_checkpoint: Path,
                                                                tmp_path: Path) -> None:
    """The vision graph is calibrated (and searched) on images the validator never shows it,
    so the parity report stays an independent check."""
    from qwen3emb.export.quant.vl_calibration import calibration_images
    from qwen3emb.validate.vl_probes import build_vl_probes

    probes = build_vl_probes(tmp_path)
    shown = [np.asarray(p.item["image"]) for p in probes if p.item.get("image") is not None]
    for image in calibration_images():
        ours = np.asarray(image)
        assert not any(ours.shape == s.shape and np.array_equal(ours, s) for s in shown)
