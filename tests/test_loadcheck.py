"""Every export load-checks what it wrote: a graph onnxruntime refuses never reaches the output.

The case that taught it: a Qwen3-VL checkpoint whose RMSNorm weights are equal across layers
(fresh initialization, some fine-tunes). The exporter merges identical initializers and named
fused norms after their weight, so two nodes shared a name and onnxruntime refused the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from qwen3emb.cli import create_app
from qwen3emb.errors import OutputError


@pytest.fixture(scope="module")
def equal_norm_vl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every RMSNorm weight of the tiny VL checkpoint reset to ones (as freshly initialized)."""
    from qwen3emb.convert.random_vl_checkpoint import build_random_vl_checkpoint

    def equal_norms(model: object) -> None:
        for name, param in model.named_parameters():  # type: ignore[attr-defined]
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                param.fill_(1.0)

    return build_random_vl_checkpoint(tmp_path_factory.mktemp("eqnorm") / "ckpt",
                                      modify=equal_norms)


def test_equal_norm_vl_checkpoint_exports_a_loadable_valid_bundle(
        equal_norm_vl_checkpoint: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "bundle"
    result = CliRunner().invoke(create_app(), ["export", str(equal_norm_vl_checkpoint), "-o",
                                               str(out), "--no-validate"])
    assert result.exit_code == 0, result.output
    for graph in ("vision", "decoder"):
        model = onnx.load(str(out / "onnx" / f"{graph}.onnx"), load_external_data=False)
        names = [n.name for n in model.graph.node if n.name]
        assert len(names) == len(set(names)), f"{graph}: duplicate node names"
        ort.InferenceSession(str(out / "onnx" / f"{graph}.onnx"),
                             providers=["CPUExecutionProvider"])
    result = CliRunner().invoke(create_app(), ["validate", str(out), "-r",
                                               str(equal_norm_vl_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output


def test_unloadable_graph_fails_the_export_and_leaves_nothing(
        equal_norm_vl_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the node-name fix the check catches the graph onnxruntime refuses. The in-memory
    tracer (dynamo with its optimizer, which merges identical initializers) is where the
    duplicate names arose; the streamed tracer binds each weight by name and merges none."""
    from qwen3emb.convert.qwen3_vl import Qwen3VLFamily
    from qwen3emb.export.onnx import optimize
    from qwen3emb.pipeline import export_bundle

    monkeypatch.setattr(optimize, "unique_node_names", lambda model: 0)
    monkeypatch.setattr(Qwen3VLFamily, "streamable", property(lambda self: False))
    out = tmp_path / "bundle"
    with pytest.raises(OutputError) as info:
        export_bundle(equal_norm_vl_checkpoint, out, validate=False)
    message = info.value.one_line()
    assert "do not load" in message and "onnx/decoder.onnx" in message
    assert "same node name" in message or "same name" in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial directory left behind


def test_large_graphs_are_checked_as_skeletons_without_their_weights(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the size limit the check loads the graph with its weights as inputs: it still
    refuses a bad graph, and accepts a good one without reading a weight."""
    from qwen3emb.export.bundle import staging

    monkeypatch.setattr(staging, "FULL_LOAD_BYTES", 0)
    model = onnx.load(str(tiny_bundle / "onnx" / "model.onnx"))
    good = tmp_path / "good.onnx"
    onnx.save_model(model, str(good), save_as_external_data=True, location="good.onnx.data",
                    size_threshold=0)
    (tmp_path / "good.onnx.data").write_bytes(b"")  # no weight byte is read
    assert staging._onnx_problem(good) is None
    named = [n for n in model.graph.node if n.name]
    named[1].name = named[0].name
    bad = tmp_path / "bad.onnx"
    onnx.save_model(model, str(bad), save_as_external_data=True, location="bad.onnx.data",
                    size_threshold=0)
    problem = staging._onnx_problem(bad)
    assert problem is not None and "onnxruntime refuses it" in problem


def test_unique_node_names_renames_only_duplicates() -> None:
    from onnx import helper

    from qwen3emb.export.onnx.graph import unique_node_names

    nodes = [helper.make_node("Relu", ["x"], [f"y{i}"], name=name)
             for i, name in enumerate(["a", "a", "b", "", "", "a"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y0", 1, [1])])
    model = helper.make_model(graph)
    assert unique_node_names(model) == 2
    assert [n.name for n in model.graph.node] == ["a", "a#1", "b", "", "", "a#2"]
    assert np.unique([n.name for n in model.graph.node if n.name]).size == 4
