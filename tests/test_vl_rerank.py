"""Qwen3-VL-Reranker: export by name, the released recipe's scores on text, image and video
pairs, batch independence, truncation that keeps the visuals, the CLI, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vl_reranker_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tied head (as the released 2B) and an untied one (as the 8B), named like the hub's."""
    from qwen3emb.convert.random_vl_checkpoint import build_random_vl_reranker

    root = tmp_path_factory.mktemp("vl-rerankers")
    return {"tied": build_random_vl_reranker(root / "tiny-Qwen3-VL-Reranker", seed=3),
            "untied": build_random_vl_reranker(root / "untied-qwen3-vl-reranker", tied=False,
                                               seed=4)}


@pytest.fixture(scope="module")
def vl_reranker_bundles(vl_reranker_checkpoints: dict[str, Path],
                        tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each exported by name (no --task), fp32 + fp16 + int8, validated by the export."""
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app

    root = tmp_path_factory.mktemp("vl-reranker-bundles")
    out = {}
    for name, checkpoint in vl_reranker_checkpoints.items():
        result = CliRunner().invoke(create_app(), [
            "export", str(checkpoint), "-o", str(root / name), "--precision", "fp16",
            "--precision", "int8"])
        assert result.exit_code == 0, (result.output, result.exception)
        assert "task: rerank (from the name" in result.stderr
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def vl_reference_rerankers(vl_reranker_checkpoints: dict[str, Path]) -> dict[str, object]:
    from qwen3emb.validate.vl_rerank import ReferenceVLReranker

    return {name: ReferenceVLReranker(path) for name, path in vl_reranker_checkpoints.items()}


def _pairs() -> tuple[dict, list]:
    from qwen3emb.convert._corpus import synthetic_image

    query = {"text": "a red sofa", "image": synthetic_image(80, 60, seed=50)}
    frames = [synthetic_image(48, 32, seed=60 + i) for i in range(4)]
    return query, ["a sofa in a living room", {"image": synthetic_image(300, 90, seed=51)},
                   {"video": frames, "text": "a clip"}, {}, ""]


def test_exports_by_name_with_a_passing_report_at_every_precision(
        vl_reranker_bundles: dict[str, Path]) -> None:
    for name, bundle in vl_reranker_bundles.items():
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["task"] == "rerank" and manifest["task_source"] == "name"
        assert manifest["modality"] == "vision-language"
        assert "embedding" not in manifest and manifest["tokenizer"]["max_length"] == 10240
        assert manifest["rerank"]["default_instruction"] == (
            "Given a search query, retrieve relevant candidates that answer the query.")
        report = json.loads((bundle / "reports" / "parity.json").read_text())
        rows = {r["precision"]: r for r in report["artifacts"]}
        assert set(rows) == {"fp32", "fp16", "int8"}, name
        assert report["passed"], [r["failures"] for r in report["artifacts"]]
        floors = {"fp32": 1e-4, "fp16": 5e-3, "int8": 0.02}
        for precision, row in rows.items():
            assert row["max_abs_score_diff"] <= floors[precision], (name, precision)
            assert row["batch_vs_single_max_diff"] <= 1e-5, (name, precision)
            probes = {k.split(":", 1)[1].split("/")[0] for k in row["score_diffs"]}
            assert {"text-to-image", "image-to-text", "text-to-video", "mixed",
                    "truncated-96"} <= {*probes, *(k.split(":")[0] for k in row["score_diffs"])}
        assert rows["fp32"]["top1_agreement"] == 1.0
        # Each decoder runs with the cheapest vision graph that keeps the fp32 decoder's score
        # within half the floor on the calibration pairs, measured at export.
        budget = {"fp32": 0.0, "fp16": 0.0025, "int8": 0.01}
        for entry in (a for a in manifest["artifacts"] if a.get("graph") == "decoder"):
            measured = entry["settings"]["vision_score_diff"]
            chosen = entry["vision_precision"]
            assert measured[chosen] <= budget[entry["precision"]], (name, entry["path"])
            assert chosen in (entry["precision"], "fp32")


def test_fp32_scores_are_the_released_recipes_on_text_image_and_video_pairs(
        vl_reranker_bundles: dict[str, Path], vl_reference_rerankers: dict[str, object]) -> None:
    from qwen3emb.runtime import VLReranker

    query, documents = _pairs()
    for name, bundle in vl_reranker_bundles.items():
        reranker = VLReranker(bundle)
        scores = reranker.score(query, documents)
        ref_scores, _ = vl_reference_rerankers[name].scores(query, documents)
        assert scores.dtype == np.float32 and scores.shape == (len(documents),)
        assert np.abs(scores - ref_scores).max() <= 1e-4, name
        assert scores.std() > 0.02  # the fixture's head spreads scores; a constant would pass
        ranked = reranker.rerank(query, documents, top_n=2)
        assert [i for i, _ in ranked] == list(np.argsort(-scores, kind="stable")[:2])


def test_a_score_does_not_depend_on_its_batch_or_its_position(
        vl_reranker_bundles: dict[str, Path]) -> None:
    from qwen3emb.runtime import VLReranker

    query, documents = _pairs()
    for precision in ("fp32", "int8"):
        reranker = VLReranker(vl_reranker_bundles["untied"], precision=precision)
        together = reranker.score(query, documents, batch_size=8)
        alone = np.array([reranker.score(query, [d])[0] for d in documents])
        reversed_ = reranker.score(query, documents[::-1], batch_size=3)[::-1]
        assert np.abs(together - alone).max() <= 1e-5, precision
        assert np.abs(together - reversed_).max() <= 1e-5, precision


def test_truncation_keeps_every_visual_token_and_the_prompt_end(
        vl_reranker_bundles: dict[str, Path], vl_reference_rerankers: dict[str, object]) -> None:
    from qwen3emb.constants import IMAGE_PAD_TOKEN
    from qwen3emb.runtime import VLReranker

    query, documents = _pairs()
    long_doc = {"text": "sofa " * 400, "image": query["image"]}
    reranker = VLReranker(vl_reranker_bundles["tied"], max_length=64)
    prepared = reranker.prepare_pairs("which sofa?", [long_doc])[0]
    pad = reranker.tokenizer.token_to_id(IMAGE_PAD_TOKEN)
    full = VLReranker(vl_reranker_bundles["tied"]).prepare_pairs("which sofa?", [long_doc])[0]
    assert prepared.truncated and not full.truncated
    assert prepared.ids.count(pad) == full.ids.count(pad) > 0
    assert prepared.ids[-5:] == full.ids[-5:]
    assert len(prepared.ids) == 64 + 5
    ref = vl_reference_rerankers["tied"]
    short = ref.limited(64)
    assert short.pair_inputs("which sofa?", long_doc, None)["input_ids"][0].tolist() == \
        prepared.ids
    assert abs(float(reranker.score("which sofa?", [long_doc])[0])
               - short.scores("which sofa?", [long_doc])[0][0]) <= 1e-4


def test_the_decoder_outputs_score_and_logits_from_the_yes_minus_no_rows(
        vl_reranker_bundles: dict[str, Path], vl_reranker_checkpoints: dict[str, Path]) -> None:
    import onnx
    from onnx import numpy_helper

    from qwen3emb.convert import family_for, load_checkpoint

    for name, bundle in vl_reranker_bundles.items():
        model = onnx.load(str(bundle / "onnx" / "decoder.onnx"))
        assert [o.name for o in model.graph.output] == ["score", "logits"]
        family = family_for(load_checkpoint(vl_reranker_checkpoints[name]), "rerank")
        head = next(numpy_helper.to_array(t) for t in model.graph.initializer
                    if t.name == "score_head")
        np.testing.assert_allclose(head, family.score_weight(), rtol=0, atol=0)
        vocab = 151669
        assert not any(vocab in t.dims and 1 < len(t.dims) and t.name != "score_head"
                       and "embed" not in t.name for t in model.graph.initializer), name


def test_rerank_command_scores_images_from_a_jsonl_file(vl_reranker_bundles: dict[str, Path],
                                                        tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app
    from qwen3emb.convert._corpus import synthetic_image
    from qwen3emb.runtime import VLReranker

    image = tmp_path / "sofa.png"
    synthetic_image(120, 80, seed=70).save(image)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"image": str(image)}) + "\n" + json.dumps("a red sofa") + "\n"
                    + json.dumps({"text": "a photo", "image": str(image)}) + "\n")
    bundle = vl_reranker_bundles["tied"]
    result = CliRunner().invoke(create_app(), ["rerank", str(bundle), "a red sofa",
                                               "--documents", str(docs), "--query-image",
                                               str(image)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    want = VLReranker(bundle).score({"text": "a red sofa", "image": str(image)},
                                    [{"image": str(image)}, "a red sofa",
                                     {"text": "a photo", "image": str(image)}])
    assert [row["index"] for row in lines] == list(np.argsort(-want, kind="stable"))
    assert max(abs(row["score"] - want[row["index"]]) for row in lines) <= 1e-6
    assert lines[[r["index"] for r in lines].index(0)]["document"] == {"image": str(image)}


def test_vl_rerankers_refuse_what_they_cannot_do_in_one_line(
        vl_reranker_bundles: dict[str, Path], vl_reranker_checkpoints: dict[str, Path],
        vl_bundle: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app
    from qwen3emb.errors import BundleError, InputError
    from qwen3emb.runtime import VLEmbedder, VLReranker

    bundle = vl_reranker_bundles["tied"]
    with pytest.raises(BundleError, match="VLReranker"):
        VLEmbedder(bundle)
    with pytest.raises(BundleError, match="VLEmbedder"):
        VLReranker(vl_bundle)
    reranker = VLReranker(bundle)
    with pytest.raises(InputError, match="document 1 has unknown keys"):
        reranker.score("q", ["fine", {"picture": "x.png"}])
    with pytest.raises(InputError, match="document 0 image"):
        reranker.score("q", [{"image": str(tmp_path / "missing.png")}])
    with pytest.raises(InputError, match="single one"):
        reranker.score("q", {"text": "a"})
    result = CliRunner().invoke(create_app(), [
        "export", str(vl_reranker_checkpoints["tied"]), "-o", str(tmp_path / "g"),
        "--format", "gguf"])
    assert result.exit_code == 2 and "no GGUF export for Qwen3-VL rerankers" in result.output
    assert not (tmp_path / "g").exists()


def test_vl_reranker_runs_without_torch(vl_reranker_bundles: dict[str, Path],
                                        run_without_torch) -> None:
    bundle = vl_reranker_bundles["untied"]
    done = run_without_torch(
        "from qwen3emb.runtime import VLReranker\n"
        "from PIL import Image\n"
        f"r = VLReranker({str(bundle)!r}, precision='int8')\n"
        "s = r.score('a sofa', ['a red sofa', {'image': Image.new('RGB', (64, 48), 'red')}])\n"
        "assert s.shape == (2,) and ((s > 0) & (s < 1)).all(), s\n"
        "print('ok')\n")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_a_server_reranks_images_beside_an_embedder(vl_reranker_bundles: dict[str, Path],
                                                     vl_bundle: Path, tmp_path: Path) -> None:
    """/v1/rerank with data-URI images and allowed files, /rerank (TEI) with texts, 16
    concurrent requests equal to single ones, and each model refusing the other's route."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_helpers import running_server

    from qwen3emb.convert._corpus import synthetic_image
    from qwen3emb.runtime import VLReranker

    def data_uri(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    images = [synthetic_image(90 + 30 * i, 70, seed=80 + i) for i in range(3)]
    (tmp_path / "media").mkdir()
    images[2].save(tmp_path / "media" / "c.png")
    bundle = vl_reranker_bundles["untied"]
    documents = [{"image": data_uri(images[0])}, "a red sofa",
                 {"text": "a photo", "image": data_uri(images[1])}, {"image": "c.png"}]
    runtime = VLReranker(bundle)
    expected = runtime.score({"text": "a sofa", "image": images[0]},
                             [{"image": images[0]}, "a red sofa",
                              {"text": "a photo", "image": images[1]}, {"image": images[2]}])
    with running_server(vl_bundle, tmp_path, bundle, "--model-name", "embed",
                        "--model-name", "rerank", "--allow-files",
                        str(tmp_path / "media")) as server:
        body = {"model": "rerank", "query": {"text": "a sofa", "image": data_uri(images[0])},
                "documents": documents, "return_documents": True}
        answer = httpx.post(server.url + "/v1/rerank", json=body, timeout=120).json()
        got = {r["index"]: r["relevance_score"] for r in answer["results"]}
        assert [r["index"] for r in answer["results"]] == list(np.argsort(-expected,
                                                                          kind="stable"))
        assert max(abs(got[i] - float(expected[i])) for i in got) <= 1e-6
        first = answer["results"][0]
        sent = documents[first["index"]]
        assert first["document"] == ({"text": sent} if isinstance(sent, str) else sent)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: httpx.post(
                server.url + "/v2/rerank", json=body, timeout=180).json(), range(16)))
        for other in answers:
            assert {r["index"]: r["relevance_score"] for r in other["results"]} == got
        tei = httpx.post(server.url + "/rerank", json={
            "model": "rerank", "query": "a sofa", "texts": ["a red sofa", "stocks"],
            "raw_scores": True}, timeout=60).json()
        logits = runtime.score_prepared(runtime.prepare_pairs("a sofa",
                                                              ["a red sofa", "stocks"]))[1]
        assert max(abs(r["score"] - float(logits[r["index"]])) for r in tei) <= 1e-5
        refused = httpx.post(server.url + "/v1/rerank", json={
            "model": "rerank", "query": "q", "documents": [{"image": "https://x/y.png"}]})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "documents[0].image"
        outside = httpx.post(server.url + "/v1/rerank", json={
            "model": "rerank", "query": "q", "documents": [{"image": "../secret.png"}]})
        assert outside.status_code == 400
        assert httpx.post(server.url + "/v1/embeddings", json={
            "model": "rerank", "input": "x"}).status_code == 400
        assert httpx.post(server.url + "/v1/rerank", json={
            "model": "embed", "query": "q", "documents": ["d"]}).status_code == 400
        schema = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
        assert {"text", "image", "video"} <= set(schema["RerankDocument"]["properties"])
        assert httpx.get(server.url + "/health").status_code == 200


def test_inspect_and_validate_read_vl_reranker_bundles(vl_reranker_bundles: dict[str, Path],
                                                        vl_reranker_checkpoints: dict[str, Path],
                                                        tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app

    bundle = vl_reranker_bundles["untied"]
    shown = CliRunner().invoke(create_app(), ["inspect", str(bundle)])
    assert shown.exit_code == 0, shown.output
    assert "qwen3_vl reranker" in shown.stdout and "<Query>:{query}" in shown.stdout
    junit, report = tmp_path / "parity.xml", tmp_path / "parity.json"
    result = CliRunner().invoke(create_app(), [
        "validate", str(bundle), "-r", str(vl_reranker_checkpoints["untied"]), "--precision",
        "int8", "--junit", str(junit), "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert 'failures="0"' in junit.read_text()
    row = json.loads(report.read_text())["artifacts"][0]
    assert row["precision"] == "int8" and row["max_abs_score_diff"] <= 0.02
    assert row["note"].startswith("with vision graph")
    with_eval = CliRunner().invoke(create_app(), [
        "validate", str(bundle), "-r", str(vl_reranker_checkpoints["untied"]), "--eval-set",
        str(tmp_path)])
    assert with_eval.exit_code == 2 and "text bundles only" in with_eval.output
