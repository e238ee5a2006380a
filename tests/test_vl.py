"""Qwen3-VL-Embedding: export, parity with transformers, preprocessing, bad inputs, no torch.

One tiny random Qwen3-VL checkpoint (real geometry: patch 16, merge 2, temporal patch 2,
48x48 position table, 3 deepstack layers, special tokens at their real ids) and one bundle
exported from it through the CLI are built once per session.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen3emb.cli import create_app
from qwen3emb.errors import InputError
from qwen3emb.runtime.vl_vision import (
    VisionGeometry,
    block_order,
    image_input,
    smart_resize,
    vision_tables,
)
from qwen3emb.validate.vl_probes import synthetic_image, write_test_video

FLOOR = 0.99999
runner = CliRunner()


@pytest.fixture(scope="session")
def vl_embedder(vl_bundle: Path):
    from qwen3emb.runtime import VLEmbedder

    return VLEmbedder(vl_bundle)


@pytest.fixture(scope="session")
def vl_reference(vl_checkpoint: Path):
    from qwen3emb.validate.vl_reference import ReferenceVLEmbedder

    return ReferenceVLEmbedder(vl_checkpoint)


# --- export, parity, CLI -----------------------------------------------------------------

@pytest.mark.slow
def test_export_writes_both_graphs_with_documented_io(vl_bundle: Path) -> None:
    import onnx

    manifest = json.loads((vl_bundle / "manifest.json").read_text())
    assert manifest["family"] == "qwen3_vl" and manifest["deepstack_layers"] == 3
    graphs = {a["graph"]: a["path"] for a in manifest["artifacts"] if a.get("graph")}
    assert graphs == {"vision": "onnx/vision.onnx", "decoder": "onnx/decoder.onnx"}

    def io_of(path: str) -> list[tuple[str, list]]:
        model = onnx.load(str(vl_bundle / path), load_external_data=False)
        return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in [*model.graph.input, *model.graph.output]]

    assert io_of(graphs["vision"]) == [
        ("pixel_patches", ["groups", "patches", 1536]), ("pos_embed_indices", ["patches", 4]),
        ("pos_embed_weights", ["patches", 4]), ("vision_position_ids", ["patches", 2]),
        ("visual_embeds", ["visual_tokens", 64]), ("deepstack_embeds", [3, "visual_tokens", 64])]
    assert io_of(graphs["decoder"]) == [
        ("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"]),
        ("position_ids", [3, "batch", "sequence"]), ("visual_embeds", ["visual_tokens", 64]),
        ("deepstack_embeds", [3, "visual_tokens", 64]), ("sentence_embedding", ["batch", 64])]
    assert manifest["onnx"]["decoder"]["outputs"][0]["name"] == "sentence_embedding"


@pytest.mark.slow
def test_parity_holds_on_every_probe_kind(vl_bundle: Path) -> None:
    report = json.loads((vl_bundle / "reports" / "parity.json").read_text())
    assert report["passed"], report
    decoder, vision = report["artifacts"]
    kinds: dict[str, float] = {}
    for key, cosine in decoder["cosines"].items():
        kind = key.split(":")[1]
        kinds[kind] = min(kinds.get(kind, 1.0), cosine)
    assert {"text", "empty", "image", "video", "video+image+text", "image+text"} <= set(kinds)
    assert min(kinds.values()) >= FLOOR, kinds
    assert any(k.startswith("batch:") for k in decoder["cosines"])
    assert any(k.startswith("mrl-") for k in decoder["cosines"])
    names = {k.split(":")[1] for k in vision["cosines"]}
    assert {"image-tiny", "image-wide", "image-tall", "image-thin", "image-rgba", "image-gray",
            "video-frames", "video-file"} <= names
    assert vision["min_cosine"] >= FLOOR


@pytest.mark.slow
def test_cli_validate_and_embed_work_like_for_text_models(vl_bundle: Path, vl_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    app = create_app()
    result = runner.invoke(app, ["validate", str(vl_bundle), "-r", str(vl_checkpoint),
                                 "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert "vision.onnx" in result.output
    image = tmp_path / "cat.png"
    synthetic_image(90, 70).save(image)
    result = runner.invoke(app, ["embed", str(vl_bundle), "a dog", "--text", "a cat",
                                 "--image", str(image), "--instruction", "Find it"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[1]["text"] == f"text=a cat + image={image}"
    assert abs(np.linalg.norm(rows[1]["embedding"]) - 1) < 1e-5
    result = runner.invoke(app, ["inspect", str(vl_bundle)])
    assert result.exit_code == 0 and "qwen3_vl" in result.output


def test_image_flags_on_a_text_bundle_exit_2(tiny_bundle: Path, tmp_path: Path) -> None:
    result = runner.invoke(create_app(), ["embed", str(tiny_bundle), "--image", "x.png"])
    assert result.exit_code == 2
    assert "is a text bundle" in result.stderr


@pytest.mark.slow
def test_deepstack_features_matter(vl_embedder, vl_reference) -> None:
    """An export that drops the deepstack maps runs fine and is wrong on images."""
    item = {"image": synthetic_image(224, 160, seed=1)}
    reference = vl_reference.embed(item)
    assert float(vl_embedder.encode([item])[0] @ reference) >= FLOOR
    original = vl_embedder.run_vision

    def without_deepstack(*args):
        embeds, deepstack = original(*args)
        return embeds, np.zeros_like(deepstack)

    vl_embedder.run_vision = without_deepstack
    try:
        ablated = float(vl_embedder.encode([item])[0] @ reference)
    finally:
        del vl_embedder.run_vision
    print(f"deepstack ablation cosine: {ablated:.6f}")
    assert ablated < 0.999


@pytest.mark.slow
def test_order_is_videos_images_texts_whatever_the_dict_order(vl_embedder) -> None:
    frames = [synthetic_image(64, 48, seed=i) for i in range(4)]
    image = synthetic_image(96, 64)
    a = vl_embedder.encode([{"text": "t", "image": image, "video": frames}])
    b = vl_embedder.encode([{"video": frames, "text": "t", "image": image}])
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_instruction_gets_a_period_unless_punctuated(vl_embedder) -> None:
    plain = vl_embedder.encode([{"text": "x"}], instruction="Find the image")
    dotted = vl_embedder.encode([{"text": "x"}], instruction="Find the image.")
    np.testing.assert_allclose(plain, dotted, atol=1e-6)
    default = vl_embedder.encode([{"text": "x"}])
    assert float(plain[0] @ default[0]) < 0.9999


# --- preprocessing vs transformers -------------------------------------------------------

@pytest.mark.parametrize("size,mode", [((224, 160), "RGB"), ((20, 12), "RGB"), ((1600, 40), "RGB"),
                                       ((30, 900), "RGB"), ((641, 479), "RGB"), ((120, 90), "L")])
def test_image_patches_match_hf_image_processor(size: tuple[int, int], mode: str) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image = synthetic_image(*size, mode=mode, seed=3)
    hf = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  min_pixels=4096, max_pixels=1843200)
    ours = image_input(image, geometry=VisionGeometry())
    out = hf(images=[image.convert("RGB")], return_tensors="np")  # HF resizes too
    assert list(ours.grid) == out["image_grid_thw"][0].tolist()
    diff = np.abs(ours.patches.reshape(-1, 1536) - out["pixel_values"]).max()
    print(f"max |patch diff| {size} {mode}: {diff:.2e}")
    assert diff <= 1e-6


def test_smart_resize_follows_qwen_vl_utils() -> None:
    from qwen3emb.validate.vl_reference import reference_smart_resize

    for h in range(1, 400, 13):
        for w in range(1, 4000, 61):
            if max(h, w) / min(h, w) <= 200:
                assert smart_resize(h, w) == reference_smart_resize(h, w, 32, 4096, 1843200)
    assert smart_resize(8, 600) == (32, 608)  # transformers' own copy gives (32, 576)
    assert smart_resize(4000, 3000) == (1536, 1152)  # above max_pixels: scaled down


def test_vision_tables_match_transformers_helpers() -> None:
    import torch
    from transformers.vision_utils import (
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    for gh, gw in ((4, 6), (2, 100), (56, 2), (30, 40)):
        grid = torch.tensor([[1, gh, gw]])
        idx, weights = get_vision_interpolation_indices_and_weights(
            grid, 48, mode="bilinear", align_corners=True, spatial_merge_size=2)
        ours_idx, ours_w, ours_pos = vision_tables(gh, gw, VisionGeometry())
        np.testing.assert_array_equal(ours_idx, idx.numpy())
        np.testing.assert_array_equal(ours_w, weights.numpy())
        np.testing.assert_array_equal(ours_pos, get_vision_position_ids(grid, 2).numpy())
    rows, cols = block_order(4, 4, 2)
    assert rows[:4].tolist() == [0, 0, 1, 1] and cols[:4].tolist() == [0, 1, 0, 1]


def test_mrope_positions_match_get_rope_index(vl_checkpoint: Path) -> None:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from qwen3emb.runtime.vl_prompt import mrope_positions
    from qwen3emb.runtime.vl_vision import VisualInput

    config = Qwen3VLConfig.from_pretrained(vl_checkpoint)
    visuals = [VisualInput("video", np.zeros((2, 24, 1)), (2, 4, 6), [0.5, 2.5]),
               VisualInput("image", np.zeros((1, 16, 1)), (1, 4, 4))]
    ids = ([1, 2, 3] + [151652] + [151656] * 6 + [151653, 9, 9] + [151652] + [151656] * 6
           + [151653] + [151652] + [151655] * 4 + [151653, 7, 7, 7])
    t = torch.tensor([ids])
    types_ = (t == 151655).int() + 2 * (t == 151656).int()
    expected, _ = Qwen3VLModel.get_rope_index(
        type("M", (), {"config": config,
                       "get_vision_position_ids": Qwen3VLModel.get_vision_position_ids})(),
        t, mm_token_type_ids=types_, image_grid_thw=torch.tensor([[1, 4, 4]]),
        video_grid_thw=torch.tensor([[2, 4, 6]]))
    ours = mrope_positions(ids, visuals, image_token_id=151655, video_token_id=151656)
    np.testing.assert_array_equal(ours, expected[:, 0].numpy())


# --- bad inputs ----------------------------------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (a decompression bomb's shape)."""
    buffer = io.BytesIO()
    synthetic_image(1, 1).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_images_raise_errors_naming_the_input(tmp_path: Path) -> None:
    geometry = VisionGeometry()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    truncated = tmp_path / "truncated.png"
    synthetic_image(300, 200).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    cases = [
        (_png_claiming(60000, 60000), "decompression bomb"),
        (synthetic_image(1000, 4), "aspect ratio 250:1"),
        (str(corrupt), "corrupt.png' is not a readable image"),
        (str(truncated), "truncated.png' is corrupt or truncated"),
        (str(tmp_path / "missing.png"), "missing.png' does not exist"),
        (3.5, "is a float, not a path"),
    ]
    for source, message in cases:
        with pytest.raises(InputError, match=message):
            image_input(source, geometry=geometry)
    with pytest.raises(InputError, match="above the safety bound of 10000"):
        image_input(synthetic_image(200, 100), geometry=geometry, max_source_pixels=10000)


def test_bad_videos_raise_errors_naming_the_input(tmp_path: Path) -> None:
    from qwen3emb.runtime.vl_video import VideoOptions, video_input

    geometry, options = VisionGeometry(), VideoOptions()
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    one = write_test_video(tmp_path / "one.mp4", frames=1)
    for source, message in [(str(fake), "fake.mp4' cannot be opened"),
                            (str(one), "has 1 frame"), ([], "is empty"),
                            (str(tmp_path / "none.mp4"), "does not exist")]:
        with pytest.raises(InputError, match=message):
            video_input(source, geometry=geometry, options=options)
    with pytest.raises(InputError, match="lasts 2 s, above the bound of 1 s"):
        video_input(str(write_test_video(tmp_path / "two.mp4", frames=8)), geometry=geometry,
                    options=VideoOptions(max_seconds=1))


def test_video_sampling_follows_the_reference(tmp_path: Path) -> None:
    from qwen3emb.runtime.vl_video import VideoOptions, read_video, sample_count, timestamps

    assert sample_count(8, 4.0, VideoOptions(), "v") == 4  # 2 s at 1 fps, at least 4 frames
    assert sample_count(3000, 30.0, VideoOptions(), "v") == 64  # 100 s: capped at 64
    assert sample_count(301, 30.0, VideoOptions(), "v") == 10  # 10 s, even count
    assert sample_count(5, 1.0, VideoOptions(), "v") == 4
    frames, indices, fps = read_video(write_test_video(tmp_path / "v.mp4"), VideoOptions(), "v")
    assert (len(frames), indices, fps) == (4, [0, 2, 5, 7], 4.0)
    assert timestamps(indices, fps, 2) == [0.25, 1.5]
    assert timestamps([0, 1, 2, 3, 4], 1.0, 2) == [0.5, 2.5, 4.0]


@pytest.mark.slow
def test_bad_items_do_not_lose_the_good_ones(vl_embedder, tmp_path: Path) -> None:
    from qwen3emb.runtime import ItemErrors

    good = [{"text": "fine"}, {"image": synthetic_image(64, 64)}]
    items = [good[0], {"image": synthetic_image(1000, 4)}, good[1], {"video": "none.mp4"},
             {"txt": "typo"}, {"text": 5}]
    with pytest.raises(ItemErrors) as info:
        vl_embedder.encode(items)
    error = info.value
    assert sorted(error.errors) == [1, 3, 4, 5]
    assert "item 1 image" in error.errors[1] and "aspect ratio" in error.errors[1]
    assert "item 3 video" in error.errors[3] and "unknown keys ['txt']" in error.errors[4]
    assert error.ok.tolist() == [True, False, True, False, False, False]
    np.testing.assert_allclose(error.embeddings[[0, 2]], vl_embedder.encode(good), atol=1e-6)
    assert error.message.startswith("4 of 6 item(s) failed: item 1 image")
    with pytest.raises(InputError, match="single item"):
        vl_embedder.encode({"text": "x"})
    with pytest.raises(InputError, match="needs .* tokens, above max_tokens=16"):
        from qwen3emb.runtime import VLEmbedder

        VLEmbedder(vl_embedder.manifest.root, max_tokens=16).encode(good[1:])


# --- torch-free runtime ------------------------------------------------------------------

@pytest.mark.slow
def test_vl_runtime_and_cli_work_without_torch(vl_bundle: Path, tmp_path: Path,
                                               run_without_torch) -> None:
    video = write_test_video(tmp_path / "clip.mp4")
    image = tmp_path / "img.png"
    synthetic_image(80, 60).save(image)
    result = run_without_torch(f"""
        import sys
        from qwen3emb.runtime import VLEmbedder
        out = VLEmbedder({str(vl_bundle)!r}).encode(
            [{{"text": "x"}}, {{"image": {str(image)!r}}}, {{"video": {str(video)!r}}}])
        assert out.shape == (3, 64), out.shape
        from typer.testing import CliRunner
        from qwen3emb.cli import create_app
        result = CliRunner().invoke(create_app(), ["embed", {str(vl_bundle)!r}, "--video",
                                                    {str(video)!r}, "--text", "clip"])
        assert result.exit_code == 0, (result.output, result.exception)
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ok")
    """, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
