"""GGUF export and the llama.cpp runtime, checked against the Hugging Face reference.

The checkpoint is the ``tiny`` preset widened to hidden 256 / ffn 512 / head_dim 64: k-quants
work on rows of 256, and with the preset's hidden 64 llama.cpp would silently store every
matrix in a fallback type (q5_0 for q4_k), so a q4_k_m test would not test a k-quant.
Fixtures live here (``gguf_`` prefix) rather than in a conftest.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen3emb.constants import FLOORS
from qwen3emb.errors import CheckpointError, InputError, MissingDependencyError

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python (the 'gguf' extra) is not installed")

REPO = Path(__file__).resolve().parents[1]
TYPES = ("f32", "q8_0", "q4_k_m")
PROBES = [
    "The quick brown fox jumps over the lazy dog.",
    ("Instruct: Given a web search query, retrieve relevant passages that answer the query\n"
     "Query:what is the capital of France?"),
    "敏捷的棕色狐狸跳过了懒狗。 emoji: 😀 🚀",
    "x",
    "def add(a, b):\n    return a + b\n",
    "<|im_start|>added tokens <think>inside</think> stay whole",
]
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 70) + " The end."


# --- fixtures, built once per session ------------------------------------------------------
@pytest.fixture(scope="session")
def gguf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen3emb.convert.random_checkpoint import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("gguf-ckpt"), preset="tiny",
                                   hidden_size=256, intermediate_size=512, head_dim=64)


@pytest.fixture(scope="session")
def gguf_end_id(gguf_checkpoint: Path) -> int:
    data = json.loads((gguf_checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    return next(t["id"] for t in data["added_tokens"] if t["content"] == "<|endoftext|>")


@pytest.fixture(scope="session")
def gguf_export(gguf_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python (the 'gguf' extra) is not installed")
    from qwen3emb.export.gguf.text import export_gguf

    out = tmp_path_factory.mktemp("gguf-out")
    return out, export_gguf(gguf_checkpoint, out, TYPES)


@pytest.fixture(scope="session")
def gguf_reference(gguf_checkpoint: Path):
    """Embed one text at a time with transformers: last token, L2-normalized."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_checkpoint)
    model = AutoModel.from_pretrained(gguf_checkpoint, dtype=torch.float32).eval()

    def embed(texts: list[str], max_length: int | None = None) -> np.ndarray:
        rows = []
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", truncation=max_length is not None,
                            max_length=max_length)
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state[0, -1]
            rows.append((hidden / hidden.norm()).numpy())
        return np.stack(rows)

    embed.tokenizer = tokenizer  # type: ignore[attr-defined]
    return embed


@pytest.fixture(scope="session")
def gguf_embedders(gguf_export):
    from qwen3emb.runtime.gguf import GGUFTextEmbedder

    out, _ = gguf_export
    embedders = {t: GGUFTextEmbedder(out / f"model-{t}.gguf") for t in TYPES}
    yield embedders
    for e in embedders.values():
        e.close()


def _read(path: Path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items()}


# --- export --------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_describes_each_file_and_leaves_no_partials(gguf_export) -> None:
    out, entries = gguf_export
    assert [e["precision"] for e in entries] == list(TYPES)
    for e in entries:
        assert e["path"] == f"model-{e['precision']}.gguf"
        assert (e["kind"], e["role"]) == ("gguf", "model") and e["scheme"]
        assert (out / e["path"]).is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(e["path"] for e in entries)


@pytest.mark.slow
@pytest.mark.parametrize("gtype", TYPES)
def test_metadata_is_what_llama_cpp_needs_for_qwen3_embedding(gguf_export, gguf_checkpoint,
                                                              gguf_end_id, gtype) -> None:
    from gguf import GGMLQuantizationType, Keys

    out, _ = gguf_export
    reader, meta = _read(out / f"model-{gtype}.gguf")
    config = json.loads((gguf_checkpoint / "config.json").read_text(encoding="utf-8"))
    assert meta[Keys.General.ARCHITECTURE] == "qwen3"
    assert meta[Keys.LLM.POOLING_TYPE.format(arch="qwen3")] == 3
    assert meta[Keys.LLM.CONTEXT_LENGTH.format(arch="qwen3")] == config["max_position_embeddings"]
    assert meta[Keys.Attention.KEY_LENGTH.format(arch="qwen3")] == config["head_dim"]
    assert meta[Keys.Tokenizer.MODEL] == "gpt2" and meta[Keys.Tokenizer.PRE] == "qwen2"
    assert meta[Keys.Tokenizer.ADD_EOS] is True and meta[Keys.Tokenizer.ADD_BOS] is False
    assert meta[Keys.Tokenizer.EOS_ID] == gguf_end_id == meta[Keys.Tokenizer.PAD_ID]
    assert meta[Keys.Tokenizer.LIST][gguf_end_id] == "<|endoftext|>"
    assert len(meta[Keys.Tokenizer.LIST]) == config["vocab_size"]
    names = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in names  # embedding model: no lm_head
    assert len(names) == 2 + 11 * config["num_hidden_layers"]  # token_embd, output_norm
    assert all(names[n] == GGMLQuantizationType.F32 for n in names if "norm" in n)
    if gtype == "q4_k_m":  # real k-quant blocks, not a fallback type
        assert GGMLQuantizationType.Q4_K in names.values()


def test_unknown_type_lists_the_supported_ones(tmp_path: Path) -> None:
    from qwen3emb.export.gguf.text import export_gguf

    with pytest.raises(InputError) as err:
        export_gguf(tmp_path, tmp_path / "out", ["q3_x"])
    text = err.value.one_line()
    assert "unknown GGUF type 'q3_x'" in text
    assert "f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k" in text
    assert not (tmp_path / "out").exists()


def test_non_qwen3_checkpoint_is_refused(tmp_path: Path) -> None:
    from qwen3emb.errors import UnsupportedModelError
    from qwen3emb.export.gguf.text import export_gguf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(UnsupportedModelError, match="model_type 'qwen3_vl'"):
        export_gguf(tmp_path, tmp_path / "out", ["f16"])


@pytest.mark.slow
def test_max_length_beyond_the_model_is_refused(gguf_checkpoint, tmp_path) -> None:
    from qwen3emb.export.gguf.text import export_gguf

    with pytest.raises(InputError) as err:
        export_gguf(gguf_checkpoint, tmp_path, ["F16"], max_length=4096)
    assert "max_length=4096 is outside 2..1024" in err.value.one_line()


@pytest.mark.slow
def test_missing_tokenizer_json_is_a_checkpoint_error(gguf_checkpoint, tmp_path) -> None:
    from qwen3emb.export.gguf.text import export_gguf

    for name in ("config.json", "model.safetensors"):
        shutil.copy(gguf_checkpoint / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        export_gguf(tmp_path, tmp_path / "out", ["f32"])


@pytest.mark.slow
def test_kquant_without_binding_names_the_gguf_extra(gguf_checkpoint, tmp_path,
                                                     monkeypatch) -> None:
    from qwen3emb.export.gguf.text import export_gguf
    from qwen3emb.runtime import _llama

    monkeypatch.setattr(_llama, "_loaded", {})
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes the import fail
    with pytest.raises(MissingDependencyError) as err:
        export_gguf(gguf_checkpoint, tmp_path / "out", ["f32", "q4_k_m"])
    assert "pip install 'qwen3emb-export[gguf]'" in err.value.one_line()
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.slow
def test_a_failed_write_leaves_no_file(gguf_checkpoint, tmp_path, monkeypatch) -> None:
    from qwen3emb.errors import OutputError
    from qwen3emb.export.gguf import common
    from qwen3emb.export.gguf import text as exporter

    real, calls = common.quantize, []

    def fail_after_three_tensors(data, qtype):
        calls.append(qtype)
        if len(calls) > 3:
            raise OSError("No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(common, "quantize", fail_after_three_tensors)
    with pytest.raises(OutputError, match="No space left on device"):
        exporter.export_gguf(gguf_checkpoint, tmp_path, ["f32"])
    assert list(tmp_path.iterdir()) == []


# --- llama.cpp parity -----------------------------------------------------------------------
@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("gtype", TYPES)
def test_llama_cpp_matches_reference_per_text(gguf_embedders, gguf_reference, gtype) -> None:
    got = np.concatenate([gguf_embedders[gtype].encode([t]) for t in PROBES])
    cosines = (got * gguf_reference(PROBES)).sum(axis=1)
    assert cosines.min() >= FLOORS[gtype], dict(zip(PROBES, cosines.round(6)))


@pytest.mark.slow
@needs_llama
def test_llama_cpp_appends_the_end_token_itself(gguf_embedders, gguf_reference,
                                                gguf_end_id) -> None:
    embedder = gguf_embedders["f32"]
    for text in PROBES:
        ids = embedder.tokenize(text)
        assert ids[-1] == gguf_end_id
        assert ids == gguf_reference.tokenizer(text)["input_ids"]


@pytest.mark.slow
@needs_llama
def test_input_longer_than_512_tokens_keeps_its_end_token(gguf_embedders, gguf_reference,
                                                          gguf_end_id) -> None:
    embedder = gguf_embedders["f32"]
    ids = embedder.tokenize(LONG)
    assert len(ids) > 512 and ids[-1] == gguf_end_id
    got = embedder.encode([LONG, "short"])
    assert embedder._lib.llama_n_ubatch(embedder._ctx) >= len(ids)
    assert float(got[0] @ gguf_reference([LONG])[0]) >= FLOORS["f32"]


@pytest.mark.slow
@needs_llama
def test_truncation_keeps_the_end_token_last(gguf_export, gguf_reference, gguf_end_id) -> None:
    from qwen3emb.runtime.gguf import GGUFTextEmbedder

    out, _ = gguf_export
    with GGUFTextEmbedder(out / "model-f32.gguf") as embedder:
        embedder.max_length = 16
        ids = embedder.tokenize(LONG)
        assert len(ids) == 16 and ids[-1] == gguf_end_id
        assert ids == gguf_reference.tokenizer(LONG, truncation=True, max_length=16)["input_ids"]
        cos = float(embedder.encode([LONG])[0] @ gguf_reference([LONG], max_length=16)[0])
    assert cos >= FLOORS["f32"]


@pytest.mark.slow
@needs_llama
def test_batch_does_not_change_an_embedding(gguf_embedders) -> None:
    embedder = gguf_embedders["f32"]
    texts = PROBES + [LONG]
    batched = embedder.encode(texts, batch_size=3)
    single = np.concatenate([embedder.encode([t]) for t in texts])
    assert ((batched * single).sum(axis=1)).min() >= 0.99999
    assert batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@needs_llama
def test_matryoshka_dimensions_and_queries(gguf_embedders) -> None:
    from qwen3emb.runtime.common import format_query, truncate_normalize

    embedder = gguf_embedders["f32"]
    full = embedder.encode(PROBES[:2])
    np.testing.assert_allclose(embedder.encode(PROBES[:2], dimensions=64),
                               truncate_normalize(full, 64), atol=1e-6)
    with pytest.raises(InputError, match="outside this bundle's Matryoshka range"):
        embedder.encode(PROBES[:1], dimensions=8)
    np.testing.assert_allclose(embedder.encode_queries(["capital of France"], task="Find it"),
                               embedder.encode([format_query("capital of France", "Find it")]),
                               atol=1e-6)
    np.testing.assert_allclose(embedder.encode_documents(PROBES[:1]), full[:1], atol=1e-6)


# --- runtime loading -------------------------------------------------------------------------
def _bundle(root: Path, export_dir: Path, entries: list[dict]) -> Path:
    from qwen3emb.constants import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION
    from qwen3emb.manifest import file_entry, write_json_atomic

    (root / "gguf").mkdir(parents=True)
    artifacts = []
    for e in entries:
        shutil.copy(export_dir / e["path"], root / "gguf" / e["path"])
        artifacts.append(file_entry(root, root / "gguf" / e["path"],
                                    **{k: v for k, v in e.items() if k != "path"}))
    write_json_atomic(root / "manifest.json", {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "family": "qwen3",
        "embedding": {"dim": 256, "mrl_min": 32}, "tokenizer": {"max_length": 1024},
        "prompt": {}, "artifacts": artifacts,
    })
    return root


@pytest.mark.slow
@needs_llama
def test_bundle_directory_opens_highest_precision_or_the_chosen_type(gguf_export,
                                                                     tmp_path) -> None:
    from qwen3emb.runtime.gguf import GGUFTextEmbedder

    out, entries = gguf_export
    bundle = _bundle(tmp_path / "bundle", out, entries[::-1])
    with GGUFTextEmbedder(bundle) as embedder:
        assert embedder.path.name == "model-f32.gguf" and embedder.max_length == 1024
    with GGUFTextEmbedder(bundle, gguf_type="q8_0") as embedder:
        assert embedder.path.name == "model-q8_0.gguf"
    with pytest.raises(InputError) as err:
        GGUFTextEmbedder(bundle, gguf_type="bf16")
    assert "has no GGUF of type 'bf16'. Available: f32, q4_k_m, q8_0" in err.value.one_line()


@pytest.mark.slow
@needs_llama
def test_gguf_without_add_eos_is_refused(gguf_checkpoint, tmp_path, monkeypatch) -> None:
    from gguf import GGUFWriter

    from qwen3emb.errors import BundleError
    from qwen3emb.export.gguf.text import export_gguf
    from qwen3emb.runtime.gguf import GGUFTextEmbedder

    monkeypatch.setattr(GGUFWriter, "add_add_eos_token",
                        lambda self, value: self.add_bool("tokenizer.ggml.add_eos_token", False))
    export_gguf(gguf_checkpoint, tmp_path, ["f32"])
    with pytest.raises(BundleError, match="does not make llama.cpp append <\\|endoftext\\|>"):
        GGUFTextEmbedder(tmp_path / "model-f32.gguf")


@pytest.mark.slow
@needs_llama
def test_runtime_imports_neither_torch_nor_transformers(gguf_export) -> None:
    out, _ = gguf_export
    code = (
        "import sys; from qwen3emb.runtime.gguf import GGUFTextEmbedder; "
        f"v = GGUFTextEmbedder({str(out / 'model-q8_0.gguf')!r}).encode(['hi']); "
        "assert v.shape == (1, 256), v.shape; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
