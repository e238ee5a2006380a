"""`serve` on the other model kinds: int8 (batched when its rows never meet, else one sequence
per call), GGUF through llama.cpp, and a Qwen3-VL bundle with image items."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import Server, running_server  # noqa: E402

TEXTS = [f"sentence {i} about " + "rivers and banks " * (i % 5) for i in range(36)]


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def _concurrently(server: Server, bodies: list[dict]) -> list[httpx.Response]:
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as ac:
            return list(await asyncio.gather(*(ac.post("/v1/embeddings", json=b)
                                               for b in bodies)))

    return asyncio.run(fire())


@pytest.fixture(scope="module")
def int8_gguf_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with an int8 ONNX model and, when llama.cpp is there, an f32 GGUF."""
    from qwen3emb.pipeline import export_bundle

    has_llama = importlib.util.find_spec("llama_cpp") is not None
    out = tmp_path_factory.mktemp("serve-int8") / "tiny-int8"
    export_bundle(tiny_checkpoint, out, validate=False, precisions=["int8"],
                  formats=["onnx", "gguf"] if has_llama else ["onnx"],
                  gguf_types=["f32"] if has_llama else [])
    return out


def _served_alone_and_batched(bundle: Path, tmp_path: Path) -> tuple[dict, np.ndarray,
                                                                       np.ndarray]:
    """``/info``, each text through the server (concurrent requests), and each run alone."""
    from qwen3emb.runtime import TextEmbedder

    alone = TextEmbedder(bundle, precision="int8").encode(TEXTS, batch_size=1)
    with running_server(bundle, tmp_path, "--precision", "int8", "--batch-wait-ms", "20") as srv:
        info = httpx.get(srv.url + "/info").json()
        responses = _concurrently(srv, [{"input": [t], "encoding_format": "float"}
                                        for t in TEXTS])
    return info, np.concatenate([_vectors(r) for r in responses]), alone


def test_searched_int8_batches_because_its_rows_never_meet(int8_gguf_bundle: Path,
                                                           tmp_path: Path) -> None:
    """Per-row int8 activations: the manifest says ``batch_independent``, the server batches
    concurrent requests, and every vector is the one the text gets alone."""
    from qwen3emb.manifest import read_manifest

    entry = read_manifest(int8_gguf_bundle).models("onnx")["int8"]
    assert entry["settings"]["batch_independent"] is True
    info, got, alone = _served_alone_and_batched(int8_gguf_bundle, tmp_path)
    assert info["precision"] == "int8" and info["one_sequence_per_call"] is False
    np.testing.assert_allclose(got, alone, atol=1e-6)


def test_fixed_recipe_int8_runs_one_sequence_per_call_so_batch_mates_do_not_matter(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A forced recipe shares one activation scale per call: served one sequence per call."""
    from qwen3emb.pipeline import export_bundle

    bundle = tmp_path / "tiny-int8-fixed"
    export_bundle(tiny_checkpoint, bundle, validate=False, precisions=["int8"],
                  int8_scheme="smoothquant")
    info, got, alone = _served_alone_and_batched(bundle, tmp_path)
    assert info["one_sequence_per_call"] is True
    np.testing.assert_allclose(got, alone, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python (the gguf extra) is not installed")
def test_gguf_precision_is_served_by_llama_cpp(int8_gguf_bundle: Path, tmp_path: Path) -> None:
    from qwen3emb.runtime import GGUFTextEmbedder, TextEmbedder

    gguf = GGUFTextEmbedder(int8_gguf_bundle, gguf_type="f32")
    try:
        expected = gguf.encode(TEXTS[:8], dimensions=32)
        ids = gguf.tokenize(TEXTS[0])
    finally:
        gguf.close()
    with running_server(int8_gguf_bundle, tmp_path, "--precision", "f32") as srv:
        info = httpx.get(srv.url + "/info").json()
        assert (info["runtime"], info["precision"]) == ("llama.cpp", "f32")
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        result = client.embeddings.create(model="tiny-int8", input=TEXTS[:8], dimensions=32)
        singles = [_vectors(r) for r in _concurrently(srv, [{"input": t} for t in TEXTS])]
        from_ids = _vectors(httpx.post(srv.url + "/v1/embeddings", json={"input": ids[:-1]}))
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert result.usage.prompt_tokens > len(TEXTS[:8])
    onnx = TextEmbedder(int8_gguf_bundle).encode(TEXTS)
    assert float(np.min(np.sum(np.concatenate(singles) * onnx, axis=1))) > 0.99999
    # llama.cpp's f32 sums in another order when a call holds several sequences: 1 - cosine
    # stays at float32 rounding (2.4e-7 measured), element-wise differences reach 2e-4 at 64 dims.
    assert float(from_ids[0] @ np.concatenate(singles)[0]) > 1 - 1e-6


# --- Qwen3-VL ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def red_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("vl-files")
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    for x in range(20):
        image.putpixel((x, x), (0, 0, 255))
    image.save(root / "red.png")
    return root / "red.png"


@pytest.fixture(scope="module")
def vl_server(vl_bundle: Path, red_png: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Server]:
    with running_server(vl_bundle, tmp_path_factory.mktemp("vl-serve"), "--model-name", "vl",
                        "--allow-files", str(red_png.parent)) as srv:
        yield srv


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_vl_image_items_match_the_runtime(vl_server: Server, vl_bundle: Path,
                                          red_png: Path) -> None:
    from qwen3emb.runtime import VLEmbedder

    embedder = VLEmbedder(vl_bundle)
    expected = embedder.encode([{"image": str(red_png), "text": "a red square"},
                                {"text": "plain text"}])
    body = {"input": [{"image": _data_uri(red_png), "text": "a red square"}, "plain text"],
            "encoding_format": "float", "model": "vl"}
    response = httpx.post(vl_server.url + "/v1/embeddings", json=body, timeout=60)
    np.testing.assert_allclose(_vectors(response), expected, atol=2e-5)
    tokens = httpx.post(vl_server.url + "/tokenize", json={"input": body["input"]}).json()
    assert [d["count"] for d in tokens["data"]] == [
        len(embedder.prepare(item, i, "Represent the user's input.").ids)
        for i, item in enumerate([{"image": str(red_png), "text": "a red square"},
                                  {"text": "plain text"}])]
    assert response.json()["usage"]["prompt_tokens"] == tokens["usage"]["prompt_tokens"]
    by_path = httpx.post(vl_server.url + "/v1/embeddings", timeout=60, json={
        "input": [{"image": "red.png", "text": "a red square"}]})
    np.testing.assert_allclose(_vectors(by_path)[0], expected[0], atol=2e-5)
    instructed = embedder.encode([{"text": "plain text"}], instruction="Find the picture")
    response = httpx.post(vl_server.url + "/v1/embeddings", timeout=60, json={
        "input": "plain text", "instruction": "Find the picture"})
    np.testing.assert_allclose(_vectors(response), instructed, atol=2e-5)
    info = httpx.get(vl_server.url + "/info").json()
    assert info["kind"] == "vl" and info["dimensions"] == expected.shape[1]


@pytest.mark.parametrize("item, code", [
    ({"image": "https://example.com/cat.png"}, "remote_url_refused"),
    ({"video": "http://example.com/v.mp4"}, "remote_url_refused"),
    ({"image": "../../etc/passwd"}, "file_refused"),
    ({"image": "data:image/png;base64,@@@"}, "invalid_input"),
    ({"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()},
     "invalid_input"),
    ({"text": "a", "audio": "x"}, "invalid_input"),
    ([1, 2, 3], "invalid_input"),
])
def test_vl_bad_items_are_refused(vl_server: Server, item: object, code: str) -> None:
    response = httpx.post(vl_server.url + "/v1/embeddings", json={"input": [item]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"].startswith("input[0]")
    assert httpx.get(vl_server.url + "/health").status_code == 200
