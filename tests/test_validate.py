"""The validator measures real differences, fails wrong artifacts and writes three formats."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from qwen3emb.validate import validate_bundle
from qwen3emb.validate.compare import ArtifactResult, ParityReport
from qwen3emb.validate.report import to_junit, to_markdown, write_report


def test_correct_bundle_passes_with_every_metric(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    report = validate_bundle(tiny_bundle, tiny_checkpoint)
    assert report.passed
    (fp32,) = report.artifacts
    assert fp32.min_cosine >= 0.99999
    assert fp32.nan_inf == 0
    assert fp32.retrieval_top1_agreement == 1.0
    assert fp32.batch_vs_single_max_diff is not None and fp32.batch_vs_single_max_diff < 1e-5
    labels = {k.split(":")[0] for k in fp32.cosines}
    assert {"probe", "padding-left", "padding-right", "single", "query", "document"} <= labels
    assert any(k.startswith("mrl-") for k in fp32.cosines)
    assert "probe:over-long" in fp32.cosines and "probe:emoji" in fp32.cosines
    assert report.reference["precision"] == "float32"


def test_artifact_from_other_weights_fails_its_floor(wrong_bundle: Path,
                                                     tiny_checkpoint: Path) -> None:
    report = validate_bundle(wrong_bundle, tiny_checkpoint)
    assert not report.passed
    (fp32,) = report.artifacts
    assert fp32.min_cosine < 0.9
    assert any("< floor 0.99999" in f for f in fp32.failures)


def test_user_texts_are_added_to_the_probe_set(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    report = validate_bundle(tiny_bundle, tiny_checkpoint, texts=["my own probe"])
    assert "probe:user-0" in report.artifacts[0].cosines


def _report(passed: bool) -> ParityReport:
    result = ArtifactResult(artifact="onnx/model.onnx", kind="onnx", precision="fp32",
                            floor=0.99999, cosines={"probe:a": 1.0 if passed else 0.5})
    return ParityReport(bundle="b", reference={"source": "r", "precision": "float32",
                                               "implementation": "transformers AutoModel"},
                        probe_max_length=256, probe_count=1, artifacts=[result],
                        tool_version="0", created="now")


def test_reports_are_written_in_three_formats(tmp_path: Path) -> None:
    written = write_report(_report(False), json_path=tmp_path / "r.json",
                           markdown_path=tmp_path / "r.md", junit_path=tmp_path / "j/r.xml")
    assert [p.name for p in written] == ["r.json", "r.md", "r.xml"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and data["artifacts"][0]["min_cosine"] == 0.5
    assert "| `onnx/model.onnx` | fp32 | 0.99999 | 0.5000000" in (tmp_path / "r.md").read_text()
    suite = ET.parse(tmp_path / "j/r.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "1"


def test_markdown_and_junit_of_a_passing_report() -> None:
    assert "parity report: PASS" in to_markdown(_report(True))
    assert 'failures="0"' in to_junit(_report(True))


def test_failed_artifact_lists_the_worst_probe() -> None:
    (failure,) = _report(False).artifacts[0].failures
    assert failure == "min cosine 0.500000 < floor 0.99999 (probe probe:a)"


def test_layer_by_layer_reference_equals_the_whole_model(deep_checkpoint) -> None:
    """One decoder layer resident at a time gives the whole fp32 model's embeddings."""
    from qwen3emb.validate.layerwise import LayerwiseReference
    from qwen3emb.validate.probes import PROBE_TEXTS
    from qwen3emb.validate.reference import ReferenceEmbedder

    texts = [text for _, text in PROBE_TEXTS[:6]]
    whole = ReferenceEmbedder(deep_checkpoint).embed(texts, 64)
    layered = LayerwiseReference(deep_checkpoint)
    got = layered.embed(texts, 64)
    assert np.abs(got - whole).max() < 2e-5
    assert (got * whole).sum(axis=1).min() > 0.999999
    assert np.allclose(layered.embed(texts[:2], 64, dimensions=32),
                       ReferenceEmbedder(deep_checkpoint).embed(texts[:2], 64, dimensions=32),
                       atol=2e-5)
    # Nothing stays resident after the pass: the backbone the layers are copied from is still
    # weightless (an 8B run otherwise keeps every layer, 31 GB, and is killed).
    assert {p.device.type for p in layered.model.parameters()} == {"meta"}


def test_validate_layerwise_reports_it_and_passes(tiny_bundle, tiny_checkpoint) -> None:
    report = validate_bundle(tiny_bundle, tiny_checkpoint, reference_dtype="layerwise")
    assert report.passed
    assert report.reference["precision"] == "float32 (layer by layer)"
    assert report.artifacts[0].min_cosine > 0.99999
