"""The ``openvino`` provider: OpenVINO compiling a bundle's graph, checked like onnxruntime."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

TEXTS = ["a short one", "ein deutscher Satz über Katzen", "x " * 90, "?"]


@pytest.fixture(scope="module")
def int_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint at fp32, int8 and int4 (searched), not yet validated."""
    from qwen3emb.pipeline import export_bundle

    out = tmp_path_factory.mktemp("ov") / "tiny-int"
    export_bundle(tiny_checkpoint, out, validate=False,
                  precisions=["fp32", "int8", "int4"], long_probes=())
    return out


def test_openvino_runs_fp32_as_onnxruntime_does(tiny_bundle):
    from qwen3emb.runtime import TextEmbedder

    ours = TextEmbedder(tiny_bundle)
    ov = TextEmbedder(tiny_bundle, "openvino", threads=2)
    assert ov.providers == ["openvino:CPU"]
    a, b = ours.encode(TEXTS), ov.encode(TEXTS)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(b, a, atol=2e-5)
    # Batched equals single on OpenVINO too (mixed lengths, padding).
    single = np.concatenate([ov.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(single, b, atol=2e-5)


def test_one_session_serves_several_threads(tiny_bundle):
    from qwen3emb.runtime import TextEmbedder

    ov = TextEmbedder(tiny_bundle, "openvino")
    expected = [ov.encode([t]) for t in TEXTS]
    got: dict[int, list[np.ndarray]] = {}

    def work(k: int) -> None:
        got[k] = [ov.encode([t]) for t in TEXTS * 3]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        for i, vec in enumerate(got[k]):
            np.testing.assert_array_equal(vec, expected[i % len(TEXTS)])


def test_openvino_stands_alone_and_names_what_is_missing(tiny_bundle, monkeypatch):
    from qwen3emb.errors import MissingDependencyError, ProviderError
    from qwen3emb.runtime import TextEmbedder
    from qwen3emb.runtime.session import resolve_providers

    with pytest.raises(ProviderError, match="cannot be combined") as info:
        resolve_providers(["openvino", "cpu"])
    assert "\n" not in info.value.one_line()
    assert resolve_providers("OpenVINO:gpu") == ["openvino:GPU"]
    with pytest.raises(Exception, match="OpenVINO has no device 'NOPE'"):
        TextEmbedder(tiny_bundle, "openvino:nope")
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match="openvino package"):
        TextEmbedder(tiny_bundle, "openvino")


def test_validate_gives_each_engine_its_own_rows(int_bundle, tiny_checkpoint, tmp_path):
    """-p cpu -p openvino: every ONNX artifact checked on both, each row saying what ran it;
    int8/int4 differ between the engines (OpenVINO quantizes the activations of 8-bit weight
    MatMuls itself) and each holds its floor."""
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app

    out = tmp_path / "report.json"
    result = CliRunner().invoke(create_app(), [
        "validate", str(int_bundle), "-r", str(tiny_checkpoint), "-p", "cpu", "-p", "openvino",
        "--long-probe", "0", "--json", str(out), "--markdown", str(out.with_suffix(".md"))])
    assert result.exit_code == 0, result.output
    assert "onnx/model_int8.onnx @ openvino:CPU" in result.output
    rows = json.loads(out.read_text())["artifacts"]
    onnx = [r for r in rows if r["kind"] == "onnx"]
    assert {(r["precision"], r["engine"]) for r in onnx} == {
        (p, e) for p in ("fp32", "int8", "int4") for e in (None, "openvino:CPU")}
    assert len(onnx) == 6
    for row in onnx:
        assert row["passed"], row
        if row["engine"]:
            assert row["checked_on"].startswith("OpenVINO ") and "CPU" in row["checked_on"]
        else:
            assert row["checked_on"].startswith("onnxruntime CPUExecutionProvider")
    by = {(r["precision"], r["engine"]): r for r in onnx}
    assert by[("fp32", None)]["min_cosine"] == pytest.approx(
        by[("fp32", "openvino:CPU")]["min_cosine"], abs=1e-5)
    assert "int8 activations per 32 channels" in by[("int8", "openvino:CPU")]["checked_on"]
    md = out.with_suffix(".md").read_text()
    assert "`onnx/model_int8.onnx @ openvino:CPU`" in md and "`onnx/model_int8.onnx`" in md


def test_embed_cli_on_openvino(tiny_bundle):
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app
    from qwen3emb.runtime import TextEmbedder

    result = CliRunner().invoke(create_app(), ["embed", str(tiny_bundle), "one text", "-p",
                                               "openvino"])
    assert result.exit_code == 0, result.output
    vec = np.asarray(json.loads(result.stdout.splitlines()[0])["embedding"], dtype=np.float32)
    np.testing.assert_allclose(vec, TextEmbedder(tiny_bundle).encode(["one text"])[0],
                               atol=2e-5)
    bad = CliRunner().invoke(create_app(), ["embed", str(tiny_bundle), "x", "-p", "openvino",
                                            "-p", "cpu"])
    assert bad.exit_code != 0 and "cannot be combined" in bad.output


def test_reranker_and_vl_run_on_openvino(reranker_bundles, vl_bundle):
    from qwen3emb.runtime import Reranker, VLEmbedder

    bundle = reranker_bundles["tied"]
    docs = ["cats sleep a lot", "the stock market fell", "?"]
    ours = Reranker(bundle).score("why do cats sleep", docs)
    ov = Reranker(bundle, "openvino").score("why do cats sleep", docs)
    np.testing.assert_allclose(ov, ours, atol=1e-5)
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8))
    items = [{"text": "a caption"}, {"image": image}]
    vl = VLEmbedder(vl_bundle, "openvino")
    assert vl.providers == ["openvino:CPU"]
    np.testing.assert_allclose(vl.encode(items), VLEmbedder(vl_bundle).encode(items),
                               atol=5e-5)


def test_corpus_refuses_an_unknown_provider_before_starting(tiny_bundle, tmp_path):
    from qwen3emb.corpus import CorpusOptions
    from qwen3emb.corpus.job import plan_job
    from qwen3emb.errors import ProviderError

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n')
    with pytest.raises(ProviderError, match="'tpu'"):
        plan_job(tiny_bundle, [str(src)], CorpusOptions(provider="tpu"))
    # Naming no provider keeps the unit keys of jobs started before providers existed.
    plain = plan_job(tiny_bundle, [str(src)], CorpusOptions())
    assert "provider" not in plain.job["options"]
    ov = plan_job(tiny_bundle, [str(src)], CorpusOptions(provider="openvino"))
    assert ov.job["options"]["provider"] == "openvino" and ov.settings.provider == "openvino"
    assert [u.key for u in ov.units] != [u.key for u in plain.units]


def test_server_backend_on_openvino(tiny_bundle):
    from qwen3emb.runtime import TextEmbedder
    from qwen3emb.serve.backend import load_backend
    from qwen3emb.serve.settings import ServeSettings

    backend = load_backend(ServeSettings(bundle=tiny_bundle, providers=("openvino",)))
    assert backend.providers == ["openvino:CPU"] and backend.on_cpu
    assert backend.info()["providers"] == ["openvino:CPU"]
    np.testing.assert_allclose(backend.embedder.encode(["hello"]),
                               TextEmbedder(tiny_bundle).encode(["hello"]), atol=2e-5)


def test_integer_models_on_openvino_say_their_parity_was_measured_elsewhere(int_bundle, caplog):
    """The export's parity ran on onnxruntime; OpenVINO changes int8/int4 numbers, so loading
    one there says how to check it (the validator itself, strict=False, does not)."""
    import logging

    from qwen3emb.runtime import TextEmbedder

    with caplog.at_level(logging.WARNING, logger="qwen3emb.runtime.session"):
        TextEmbedder(int_bundle, "openvino", precision="fp32", strict=False)
        TextEmbedder(int_bundle, "openvino", precision="int8", strict=False)
        assert not [r for r in caplog.records if "OpenVINO" in r.getMessage()]
        TextEmbedder(int_bundle, "openvino", precision="int8")
    lines = [r.getMessage() for r in caplog.records if "OpenVINO" in r.getMessage()]
    assert len(lines) == 1 and "validate BUNDLE -r REFERENCE -p openvino" in lines[0]
