"""Other tools load a bundle from its directory with no code of ours, and embed like our runtime.

sentence-transformers, fastembed (in their own venv: optimum-onnx pins transformers < 4.58)
and transformers.js (Node) run the model card's own snippets; llama-cpp-python's OpenAI server
embeds the GGUF. Their environments come from scripts/consumer_envs.sh (run by .ci/run); a
test skips only when its environment is not there. TEI and Ollama cannot run here: their files
and fields are checked.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from qwen3emb.constants import DEFAULT_TASK, FLOORS, LAST_HIDDEN_STATE, SENTENCE_EMBEDDING
from qwen3emb.export.bundle.card import PLACEHOLDER, SNIPPETS

CONSUMERS = Path(os.environ.get("QWEN3EMB_CONSUMERS",
                                Path.home() / ".cache" / "qwen3emb-consumers"))
ST_PYTHON = CONSUMERS / "st-venv" / "bin" / "python"
NODE_DIR = CONSUMERS / "node"
TIMEOUT = 300

QUERIES = ["What is the capital of China?", "Explain gravity"]
TEXTS = ["The capital of China is Beijing.",
         "Gravity is a force that attracts two bodies towards each other. " * 3,
         "a b"]
"""Mixed lengths, so each tool pads a batch its own way."""


def _needs(environment: Path, what: str) -> None:
    """Skip when scripts/consumer_envs.sh did not finish ``environment`` (its ``.ok`` mark)."""
    if not (environment / ".ok").is_file():
        pytest.skip(f"{what} environment not created in {environment} "
                    "(run scripts/consumer_envs.sh)")


@pytest.fixture(scope="module")
def interop_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with fp32/int8/int4 ONNX and f32/q8_0 GGUF files, its ONNX weights
    in external data files as a real model's are (above 1 GiB), so every tool is tested on the
    ``model.onnx_data`` layout."""
    from qwen3emb.export.onnx import trace
    from qwen3emb.pipeline import export_bundle

    out = tmp_path_factory.mktemp("interop") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trace, "EXTERNAL_DATA_THRESHOLD", 0)
        export_bundle(tiny_checkpoint, out, validate=False, precisions=["int8", "int4"],
                      formats=["onnx", "gguf"], gguf_types=["f32", "q8_0"])
    return out


@pytest.fixture(scope="module")
def ours(interop_bundle: Path) -> dict[str, dict[str, np.ndarray]]:
    """Our runtime's embeddings of QUERIES (with the default instruction) and TEXTS."""
    from qwen3emb.runtime import TextEmbedder

    out = {}
    for precision in ("fp32", "int8", "int4"):
        embedder = TextEmbedder(interop_bundle, precision=precision)
        out[precision] = {"queries": embedder.encode_queries(QUERIES),
                          "texts": embedder.encode(TEXTS)}
    return out


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def _check(got: dict[str, list], ours: dict[str, dict[str, np.ndarray]], precision: str,
           tool: str) -> None:
    """The tool's vectors against our runtime's on the same file and on fp32, at
    ``precision``'s floor. Quantized files are not bit-stable across tools: their activations
    are quantized per tensor, over the whole padded batch, and each tool batches its own way."""
    for key in ("queries", "texts"):
        same = _min_cosine(got[key], ours[precision][key])
        to_fp32 = _min_cosine(got[key], ours["fp32"][key])
        print(f"{tool} {precision} {key}: min cosine {same:.7f} to ours, {to_fp32:.7f} to fp32")
        assert same >= FLOORS[precision], (tool, precision, key, same)
        assert to_fp32 >= FLOORS[precision], (tool, precision, key, to_fp32)


def _run(command: list[str], cwd: Path | None = None) -> dict[str, list]:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- sentence-transformers (ONNX backend) ----------------------------------------------------
@pytest.mark.slow
def test_sentence_transformers_loads_the_bundle(interop_bundle, ours, tmp_path):
    _needs(ST_PYTHON.parents[1], "sentence-transformers")
    snippet = SNIPPETS["sentence-transformers"][1].replace(PLACEHOLDER, str(interop_bundle))
    script = tmp_path / "st_check.py"
    script.write_text(snippet + f"""
import json
out = {{}}
for precision, kwargs in (("fp32", {{}}),
                          ("int8", {{"model_kwargs": {{"file_name": "onnx/model_int8.onnx"}}}})):
    model = SentenceTransformer({str(interop_bundle)!r}, backend="onnx", **kwargs)
    out[precision] = {{"queries": model.encode({QUERIES!r}, prompt_name="query").tolist(),
                       "texts": model.encode({TEXTS!r}).tolist()}}
print(json.dumps(out))
""")
    got = _run([str(ST_PYTHON), str(script)])
    for precision in ("fp32", "int8"):
        _check(got[precision], ours, precision, "sentence-transformers")


# --- fastembed ------------------------------------------------------------------------------
@pytest.mark.slow
def test_fastembed_loads_every_onnx_file(interop_bundle, ours, tmp_path):
    _needs(ST_PYTHON.parents[1], "fastembed")
    snippet = SNIPPETS["fastembed"][1].replace(
        "DIM", str(ours["fp32"]["texts"].shape[1])).replace(
        f'TextEmbedding("{PLACEHOLDER}")',
        f'TextEmbedding("{PLACEHOLDER}", specific_model_path="{interop_bundle}")').replace(
        PLACEHOLDER, str(interop_bundle))
    script = tmp_path / "fastembed_check.py"
    script.write_text(snippet + f"""
import json
out = {{}}
for precision, file in (("fp32", "onnx/model.onnx"), ("int8", "onnx/model_int8.onnx"),
                        ("int4", "onnx/model_int4.onnx")):
    name = "qwen3emb-check/" + precision
    TextEmbedding.add_custom_model(
        model=name, pooling=PoolingType.DISABLED, normalization=False,
        sources=ModelSource(hf="local/bundle"), dim={ours["fp32"]["texts"].shape[1]},
        model_file=file, output_name="sentence_embedding")
    m = TextEmbedding(name, specific_model_path="{interop_bundle}")
    out[precision] = {{
        "queries": [v.tolist() for v in m.embed(
            [f"Instruct: {{task}}\\nQuery:{{q}}" for q in {QUERIES!r}])],
        "texts": [v.tolist() for v in m.embed({TEXTS!r})]}}
out["snippet"] = {{"queries": [v.tolist() for v in queries],
                   "documents": [v.tolist() for v in documents]}}
print(json.dumps(out))
""")
    got = _run([str(ST_PYTHON), str(script)])
    assert _min_cosine(got["snippet"]["documents"], ours["fp32"]["texts"][:1]) >= FLOORS["fp32"]
    for precision in ("fp32", "int8", "int4"):
        _check(got[precision], ours, precision, "fastembed")


# --- transformers.js --------------------------------------------------------------------------
@pytest.mark.slow
def test_transformers_js_loads_the_bundle(interop_bundle, ours, tmp_path):
    _needs(NODE_DIR, "transformers.js")
    (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules")
    snippet = SNIPPETS["transformers.js"][1].replace(PLACEHOLDER, interop_bundle.name)
    prologue = ("import { env } from '@huggingface/transformers';\n"
                f"env.localModelPath = {json.dumps(str(interop_bundle.parent) + '/')};\n"
                "env.allowRemoteModels = false;\n")
    epilogue = f"""
const out = {{}};
for (const [precision, dtype] of [['fp32', 'fp32'], ['int8', 'int8']]) {{
  const model = await pipeline('feature-extraction', '{interop_bundle.name}', {{ dtype }});
  const prompted = {json.dumps(QUERIES)}.map((q) => `Instruct: ${{task}}\\nQuery:${{q}}`);
  out[precision] = {{ queries: (await model(prompted, options)).tolist(),
                      texts: (await model({json.dumps(TEXTS)}, options)).tolist() }};
}}
const mean = await extractor({json.dumps(TEXTS)}, {{ pooling: 'mean', normalize: true }});
out.mean = mean.tolist();
process.stdout.write('\\n' + JSON.stringify(out) + '\\n');
"""
    script = tmp_path / "tjs_check.mjs"
    script.write_text(prologue + snippet + epilogue)
    got = _run(["node", str(script)], cwd=tmp_path)
    for precision in ("fp32", "int8"):
        _check(got[precision], ours, precision, "transformers.js")
    # Any pooling of the broadcast last_hidden_state gives the embedding back.
    assert _min_cosine(got["mean"], ours["fp32"]["texts"]) >= FLOORS["fp32"]


# --- llama.cpp: llama-cpp-python's OpenAI server ------------------------------------------------
@pytest.mark.slow
def test_llama_cpp_server_embeds_the_gguf_with_no_pooling_flag(interop_bundle, ours):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette", reason="install the interop extra (llama_cpp.server)")
    from qwen3emb.runtime import GGUFTextEmbedder

    prompted = [f"Instruct: {DEFAULT_TASK}\nQuery:{q}" for q in QUERIES]
    for gguf, precision in (("model-f32.gguf", "fp32"), ("model-q8_0.gguf", "int8")):
        got = _serve_and_embed(interop_bundle / "gguf" / gguf, prompted + TEXTS)
        runtime = GGUFTextEmbedder(interop_bundle, gguf_type=gguf[6:-5])
        try:
            mine = np.concatenate([runtime.encode_queries(QUERIES), runtime.encode(TEXTS)])
        finally:
            runtime.close()
        same = _min_cosine(got, mine)
        onnx = np.concatenate([ours["fp32"]["queries"], ours["fp32"]["texts"]])
        to_onnx = _min_cosine(got, onnx)
        print(f"llama.cpp server {gguf}: min cosine {same:.7f} to our GGUF runtime, "
              f"{to_onnx:.7f} to our ONNX fp32")
        assert same >= FLOORS["fp32"]
        assert to_onnx >= FLOORS[precision]


def _serve_and_embed(gguf: Path, texts: list[str]) -> np.ndarray:
    """Start ``python -m llama_cpp.server`` on a free loopback port, embed, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--embedding", "true",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_batch", "1024",
         "--n_ubatch", "1024"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/embeddings", data=json.dumps({"input": texts}).encode(),
            headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    data = json.load(response)["data"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
                assert time.monotonic() < deadline, "llama_cpp.server did not start in 120 s"
                time.sleep(0.3)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])])


# --- what every loader reads, including the ones that cannot run here -----------------------------
def test_graphs_keep_sentence_embedding_first_and_broadcast_it(interop_bundle):
    import onnxruntime as ort

    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=np.int64)
    for name in ("model.onnx", "model_int8.onnx", "model_int4.onnx"):
        session = ort.InferenceSession(str(interop_bundle / "onnx" / name),
                                       providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == [SENTENCE_EMBEDDING, LAST_HIDDEN_STATE]
        embedding, hidden = session.run(None, {"input_ids": ids, "attention_mask": mask})
        assert hidden.shape == (*ids.shape, embedding.shape[1])
        np.testing.assert_array_equal(hidden, np.broadcast_to(embedding[:, None], hidden.shape))


def test_tei_and_ollama_files_and_fields_are_present(interop_bundle):
    from qwen3emb.export.bundle.interop import check_interop_files

    assert check_interop_files(interop_bundle) == []
    config = json.loads((interop_bundle / "config.json").read_text())
    checkpoint = json.loads((interop_bundle / "manifest.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"]
    assert config["hidden_size"] == checkpoint["embedding"]["dim"]
    external = {"model.onnx": 1, "model_int8.onnx": 1, "model_int4.onnx": 1}
    assert config["transformers.js_config"] == {"dtype": "fp32",
                                                "use_external_data_format": external}
    for name in external:  # the name transformers.js and TEI fetch: <file>_data
        assert (interop_bundle / "onnx" / f"{name}_data").is_file()
    pooling = json.loads((interop_bundle / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
    st = json.loads((interop_bundle / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": f"Instruct: {DEFAULT_TASK}\nQuery:", "document": ""}
    assert st["default_prompt_name"] is None
    modelfile = (interop_bundle / "gguf" / "Modelfile").read_text().splitlines()
    assert [line for line in modelfile if line.startswith("FROM ")] == ["FROM ./model-q8_0.gguf"]
    # The interop files are hashed like the models; the card is not (it changes after parity).
    manifest = json.loads((interop_bundle / "manifest.json").read_text())
    paths = {a["path"] for a in manifest["artifacts"] if a.get("role") == "interop"}
    assert {"config.json", "modules.json", "1_Pooling/config.json", "gguf/Modelfile",
            "config_sentence_transformers.json"} <= paths
    assert manifest["interop"]["tools"][:3] == ["sentence-transformers", "transformers.js",
                                                "fastembed"]


def test_model_card_has_hub_metadata_parity_and_a_snippet_per_tool(tiny_bundle):
    card = (tiny_bundle / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: sentence-transformers" in front
    assert "pipeline_tag: feature-extraction" in front
    for tag in ("onnx", "sentence-transformers", "transformers.js", "text-embeddings-inference"):
        assert f"- {tag}\n" in front
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    value = manifest["parity"]["min_cosine"]["fp32"]
    assert f"| fp32 | {value:.6f} | {FLOORS['fp32']} |" in card
    for heading in ("sentence-transformers", "transformers.js", "fastembed", "Text Embeddings"):
        assert f"### {heading}" in card
    assert "### Ollama" not in card  # no GGUF in this bundle


def test_hub_id_sources_become_base_model():
    from qwen3emb.export.bundle.card import render_model_card

    manifest = {"family": "qwen3", "source": {"model": "Qwen/Qwen3-Embedding-0.6B"},
                "artifacts": [], "interop": {"tools": ["fastembed"]}}
    front = render_model_card(manifest).split("---")[1]
    assert "base_model: Qwen/Qwen3-Embedding-0.6B\n" in front
    assert "library_name: onnx" in front


# --- push -------------------------------------------------------------------------------------
def test_push_fails_in_one_line_when_the_hub_is_unreachable(tiny_bundle, monkeypatch):
    import huggingface_hub.constants
    from typer.testing import CliRunner

    from qwen3emb.cli import create_app

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(create_app(), ["push", str(tiny_bundle), "me/qwen3-onnx",
                                               "--token", "hf_unused"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: cannot push '{tiny_bundle}' to the Hub repo 'me/qwen3-onnx': "
        "OfflineModeIsEnabled"), result.output
    assert "HF_HUB_OFFLINE" in lines[0]


def test_push_reports_a_refused_connection(tiny_bundle):
    # A closed loopback port: refused at once, so this cannot hang (and a timeout guards it).
    code = ("import sys; from qwen3emb.cli import main; "
            f"sys.argv = ['qwen3emb-export', 'push', {str(tiny_bundle)!r}, 'me/x', "
            "'--token', 'hf_unused']; main()")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: cannot push"), proc.stderr
    assert "ConnectError" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_push_refuses_a_bundle_with_a_bad_hash(tiny_bundle, tmp_path):
    import shutil

    from qwen3emb.errors import BundleError
    from qwen3emb.hub import push_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    (copy / "modules.json").write_text("[]")
    with pytest.raises(BundleError, match="hash check"):
        push_bundle(copy, "me/x", token="hf_unused")


def test_vl_bundles_claim_no_other_tool_and_say_so(vl_bundle):
    # Shares the session's VL bundle with tests/test_vl.py (no extra export in the suite).
    card = (vl_bundle / "README.md").read_text()
    manifest = json.loads((vl_bundle / "manifest.json").read_text())
    assert manifest["interop"]["tools"] == []
    assert not (vl_bundle / "config.json").exists() and not (vl_bundle / "modules.json").exists()
    assert "## Not supported" in card and "transformers.js" in card.split("## Not supported")[1]
    assert "pipeline_tag: feature-extraction" in card.split("---")[1]


def test_push_needs_no_torch(tiny_bundle, run_without_torch):
    result = run_without_torch(f"""
        import os
        os.environ["HF_HUB_OFFLINE"] = "1"
        from qwen3emb.errors import OutputError
        from qwen3emb.hub import push_bundle
        try:
            push_bundle({str(tiny_bundle)!r}, "me/x", token="hf_unused")
        except OutputError as e:
            print(e.one_line())
    """)
    assert result.returncode == 0, result.stderr
    assert "OfflineModeIsEnabled" in result.stdout
