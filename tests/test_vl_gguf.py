"""Qwen3-VL-Embedding as GGUF: a qwen3vl text model + a qwen3vl_merger mmproj, run by unmodified
llama.cpp and libmtmd through llama-cpp-python, compared with the transformers reference.

One tiny random Qwen3-VL checkpoint and one validated GGUF-only bundle (f32 + q8_0) are built
once per module; the parity numbers come from that bundle's report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwen3emb.errors import InputError

pytest.importorskip("llama_cpp")

FLOOR = 0.99999
TEXTS = [{"text": "A photo of a cat sitting on a red sofa."},
         {"text": "敏捷的棕色狐狸 — le renard brun 🦊"}, {}]


@pytest.fixture(scope="module")
def checkpoint(vl_checkpoint: Path) -> Path:
    return vl_checkpoint


@pytest.fixture(scope="module")
def bundle(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GGUF only (no ONNX), validated: the report holds every measured cosine."""
    from qwen3emb.pipeline import export_bundle

    out = tmp_path_factory.mktemp("vl-gguf-bundle") / "tiny-vl"
    result = export_bundle(checkpoint, out, formats=["gguf"], gguf_types=["f32", "q8_0"])
    assert result.passed, result.report.to_dict()
    return out


@pytest.fixture(scope="module")
def report(bundle: Path) -> dict:
    return json.loads((bundle / "reports" / "parity.json").read_text())


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    from qwen3emb.validate.vl_reference import ReferenceVLEmbedder

    return ReferenceVLEmbedder(checkpoint)


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    fields["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields


# --- files and metadata --------------------------------------------------------------------

@pytest.mark.slow
def test_bundle_lists_each_text_gguf_with_its_mmproj(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    gguf = {a["path"]: a for a in manifest["artifacts"] if a["kind"] == "gguf"}
    assert gguf["gguf/model-f32.gguf"]["mmproj"] == "gguf/mmproj-f32.gguf"
    assert gguf["gguf/model-q8_0.gguf"]["mmproj"] == "gguf/mmproj-f16.gguf"
    assert {a["role"] for a in gguf.values()} == {"model", "mmproj"}
    assert "onnx" not in manifest and manifest["gguf"]["projector_type"] == "qwen3vl_merger"
    assert (manifest["gguf"]["image_min_tokens"], manifest["gguf"]["image_max_tokens"]) == (4,
                                                                                           1800)


@pytest.mark.slow
def test_text_gguf_is_qwen3vl_pooling_last_without_end_token(bundle: Path) -> None:
    f = _fields(bundle / "gguf" / "model-f32.gguf")
    assert f["general.architecture"] == "qwen3vl"
    assert f["qwen3vl.pooling_type"] == 3
    assert f["qwen3vl.n_deepstack_layers"] == 3
    assert list(f["qwen3vl.rope.dimension_sections"]) == [6, 5, 5, 0]
    assert f["qwen3vl.rope.freq_base"] == pytest.approx(5e6)
    assert f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert "output.weight" not in f["tensors"]  # no lm_head
    assert "token_embd.weight" in f["tensors"]


@pytest.mark.slow
def test_mmproj_is_qwen3vl_merger_with_deepstack_and_reference_pixels(bundle: Path) -> None:
    f = _fields(bundle / "gguf" / "mmproj-f16.gguf")
    assert f["general.architecture"] == "clip"
    assert f["clip.projector_type"] == "qwen3vl_merger"
    assert f["clip.vision.image_min_pixels"] == 4096
    assert f["clip.vision.image_max_pixels"] == 1843200
    assert f["clip.vision.patch_size"] == 16 and f["clip.vision.spatial_merge_size"] == 2
    assert list(f["clip.vision.image_mean"]) == [0.5] * 3 == list(f["clip.vision.image_std"])
    assert list(f["clip.vision.is_deepstack_layers"]) == [True, True, True, False]
    assert f["clip.vision.projection_dim"] == 64
    tensors = f["tensors"]
    for layer in (0, 1, 2):
        for part in ("norm", "fc1", "fc2"):
            assert f"v.deepstack.{layer}.{part}.weight" in tensors
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.2.weight",
            "v.post_ln.weight"} <= set(tensors)
    assert tensors["v.position_embd.weight"] == "F32"
    assert tensors["v.blk.0.attn_qkv.weight"] == "F16"


def test_unknown_gguf_type_is_refused_before_writing(tmp_path: Path) -> None:
    from qwen3emb.export.gguf.vl import export_vl_gguf

    with pytest.raises(InputError, match="unknown GGUF type 'q3_x'"):
        export_vl_gguf(tmp_path, tmp_path / "out", ["f32", "q3_x"])
    assert not (tmp_path / "out").exists()


# --- llama.cpp runtime ---------------------------------------------------------------------

@pytest.mark.slow
def test_pair_loads_in_llama_cpp_and_libmtmd(bundle: Path) -> None:
    from qwen3emb.runtime.gguf_vl import GGUFVLEmbedder

    with GGUFVLEmbedder(bundle, gguf_type="q8_0") as embedder:
        assert embedder.mmproj_path.name == "mmproj-f16.gguf"
        assert embedder._mtmd.mtmd_decode_use_mrope(embedder._mtmd_ctx)
        assert embedder._lib.llama_model_n_embd_inp(embedder._model) == 64 * 4  # + deepstack
        out = embedder.encode(TEXTS[:1])
    assert out.shape == (1, 64) and np.isfinite(out).all()


@pytest.mark.slow
def test_text_embeddings_meet_f32_floor(bundle: Path, reference) -> None:
    from qwen3emb.runtime.gguf_vl import GGUFVLEmbedder

    with GGUFVLEmbedder(bundle, gguf_type="f32") as embedder:
        ours = embedder.encode(TEXTS)
        queries = embedder.encode(TEXTS[:1], instruction="Retrieve images that match")
        cut = embedder.encode(TEXTS[:1], dimensions=32 * 2)
    refs = np.stack([reference.embed(item) for item in TEXTS])
    query_ref = reference.embed(TEXTS[0], "Retrieve images that match")
    assert (np.sum(ours * refs, axis=1) >= FLOOR).all(), np.sum(ours * refs, axis=1)
    assert float(queries[0] @ query_ref) >= FLOOR
    assert np.linalg.norm(cut[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_images_resized_like_the_reference_meet_f32_floor(report: dict) -> None:
    f32 = next(a for a in report["artifacts"] if a["artifact"] == "gguf/model-f32.gguf")
    images = {k: v for k, v in f32["cosines"].items() if "image" in k}
    assert len(images) >= 8 and f32["passed"]
    assert min(images.values()) >= FLOOR, images
    q8 = next(a for a in report["artifacts"] if a["artifact"] == "gguf/model-q8_0.gguf")
    assert q8["passed"] and q8["min_cosine"] >= 0.99


@pytest.mark.slow
def test_llama_cpp_own_image_resize_gap_is_measured_and_reported(bundle: Path,
                                                                 report: dict) -> None:
    own = next(a for a in report["artifacts"] if a["informational"])
    assert own["artifact"].endswith("(llama.cpp image resize)")
    values = list(own["cosines"].values())
    assert len(values) >= 8 and np.isfinite(values).all() and own["nan_inf"] == 0
    assert report["passed"]  # measured, not gated
    markdown = (bundle / "reports" / "parity.md").read_text()
    assert f"{own['min_cosine']:.7f}" in markdown
    assert "reported (not gated)" in markdown


@pytest.mark.slow
def test_video_is_refused_per_item_with_the_reason(bundle: Path) -> None:
    from qwen3emb.runtime.gguf_vl import GGUFVLEmbedder
    from qwen3emb.runtime.vl import ItemErrors
    from qwen3emb.validate.vl_probes import synthetic_image

    frames = [synthetic_image(64, 48, seed=i) for i in range(4)]
    with GGUFVLEmbedder(bundle, gguf_type="f32") as embedder, \
            pytest.raises(ItemErrors) as caught:
        embedder.encode([{"text": "ok"}, {"video": frames}])
    reason = caught.value.errors[1]
    assert "item 1 has a video" in reason and "ONNX VLEmbedder" in reason
    assert caught.value.ok.tolist() == [True, False]


@pytest.mark.slow
def test_bad_resize_mode_names_the_choices(bundle: Path) -> None:
    from qwen3emb.runtime.gguf_vl import GGUFVLEmbedder

    with pytest.raises(InputError, match="resize='bicubic'") as caught:
        GGUFVLEmbedder(bundle, resize="bicubic")
    assert "reference, llama.cpp" in str(caught.value.hint)


@pytest.mark.slow
def test_gguf_runtime_embeds_text_and_image_without_torch(bundle: Path,
                                                          run_without_torch) -> None:
    result = run_without_torch(f"""
        import sys
        from PIL import Image
        from qwen3emb.runtime.gguf_vl import GGUFVLEmbedder
        image = Image.new("RGB", (50, 40), (200, 30, 60))
        vectors = GGUFVLEmbedder({str(bundle)!r}).encode([{{"text": "hi"}}, {{"image": image}}])
        assert vectors.shape == (2, 64), vectors.shape
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
