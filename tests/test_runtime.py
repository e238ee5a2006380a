"""The torch-free runtime matches the HuggingFace recipe, whatever the batch or padding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwen3emb.constants import DEFAULT_TASK
from qwen3emb.errors import BundleError, InputError, ProviderError
from qwen3emb.runtime import TextEmbedder, format_query
from qwen3emb.validate.compare import row_cosines
from qwen3emb.validate.probes import PROBE_TEXTS

TEXTS = [t for _, t in PROBE_TEXTS]
FP32_FLOOR = 0.99999


@pytest.fixture(scope="module")
def embedder(tiny_bundle: Path) -> TextEmbedder:
    return TextEmbedder(tiny_bundle)


def test_every_probe_matches_the_reference_at_the_fp32_floor(embedder: TextEmbedder,
                                                             reference) -> None:
    ours = embedder.encode(TEXTS, batch_size=5)
    ref = reference.embed(TEXTS, embedder.max_length)
    assert row_cosines(ours, ref).min() >= FP32_FLOOR
    assert np.abs(ours - ref).max() < 1e-5


def test_output_is_float32_unit_norm(embedder: TextEmbedder) -> None:
    out = embedder.encode(["one", "two words"])
    assert out.dtype == np.float32 and out.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_padding_side_does_not_change_embedding(embedder: TextEmbedder) -> None:
    ids = embedder.tokenize(["short", "a much longer text with many more tokens in it", "mid text"])
    left = embedder.run_ids(*embedder.pad(ids, "left"))
    right = embedder.run_ids(*embedder.pad(ids, "right"))
    alone = np.concatenate([embedder.run_ids(*embedder.pad([row])) for row in ids])
    np.testing.assert_allclose(left, right, atol=1e-6)
    np.testing.assert_allclose(left, alone, atol=1e-6)


def test_batch_composition_does_not_change_embedding(embedder: TextEmbedder) -> None:
    together = embedder.encode(TEXTS, batch_size=32)
    singles = np.concatenate([embedder.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(together, singles, atol=1e-6)
    assert together.shape[0] == len(TEXTS)  # order restored after length bucketing


def test_query_instruction_is_the_exact_model_card_string(embedder: TextEmbedder,
                                                          reference) -> None:
    expected_custom = "Instruct: Find papers\nQuery:what is rope?"
    assert format_query("what is rope?", "Find papers") == expected_custom
    expected = f"Instruct: {DEFAULT_TASK}\nQuery:what is rope?"
    ours = embedder.encode_queries(["what is rope?"])
    ref = reference.embed([expected], embedder.max_length)
    assert row_cosines(ours, ref)[0] >= FP32_FLOOR
    custom = embedder.encode_queries(["what is rope?"], task="Find papers")
    assert row_cosines(custom, ours)[0] < 0.9999  # the task really changes the input


def test_documents_get_no_instruction(embedder: TextEmbedder) -> None:
    np.testing.assert_array_equal(embedder.encode_documents(["doc"]), embedder.encode(["doc"]))


def test_end_token_is_appended_and_survives_truncation(embedder: TextEmbedder,
                                                       reference) -> None:
    end = embedder.pad_id
    assert embedder.tokenize(["hello"])[0][-1] == end
    long_text = "many words here " * 2000
    (ids,) = embedder.tokenize([long_text])
    assert len(ids) == embedder.max_length and ids[-1] == end
    short = TextEmbedder(embedder.manifest.root, max_length=16)
    (cut,) = short.tokenize([long_text])
    assert len(cut) == 16 and cut[-1] == end
    ref = reference.embed([long_text], 16)
    assert row_cosines(short.encode([long_text]), ref)[0] >= FP32_FLOOR


def test_mask_is_not_built_from_pad_id(embedder: TextEmbedder, reference) -> None:
    # The text itself contains the pad/end token; a mask from `ids != pad_id` would drop it.
    text = "literal <|endoftext|> inside"
    (ids,) = embedder.tokenize([text])
    assert ids.count(embedder.pad_id) == 2
    ref = reference.embed([text], embedder.max_length)
    assert row_cosines(embedder.encode([text, "x"])[:1], ref)[0] >= FP32_FLOOR


def test_matryoshka_dimensions_cut_then_renormalize(embedder: TextEmbedder, reference) -> None:
    full = embedder.encode(["matryoshka"])
    cut = embedder.encode(["matryoshka"], dimensions=32)
    assert cut.shape == (1, 32)
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-6)
    assert row_cosines(cut, reference.embed(["matryoshka"], embedder.max_length, 32))[0] >= 0.99999


@pytest.mark.parametrize("bad, message", [
    ([], "input list is empty"),
    ([""], "text 0 is an empty string"),
    (["ok", 3], "text 1 is a int"),
    ("a bare string", "single string"),
])
def test_bad_texts_are_rejected_with_the_reason(embedder: TextEmbedder, bad: object,
                                                message: str) -> None:
    with pytest.raises(InputError, match=message):
        embedder.encode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("dims", [16, 65, 0])
def test_dimensions_outside_the_range_are_rejected(embedder: TextEmbedder, dims: int) -> None:
    with pytest.raises(InputError, match="Matryoshka range 32..64"):
        embedder.encode(["x"], dimensions=dims)


def test_unavailable_provider_lists_the_available_ones(tiny_bundle: Path) -> None:
    with pytest.raises(ProviderError) as info:
        TextEmbedder(tiny_bundle, providers=["tensorrt"])
    assert "not available" in info.value.message and "Available: cpu" in info.value.message


def test_unknown_precision_lists_available_ones(tiny_bundle: Path) -> None:
    with pytest.raises(InputError, match="no 'int3' ONNX model") as info:
        TextEmbedder(tiny_bundle, precision="int3")
    assert "Available precisions: fp32" in info.value.one_line()


def test_tampered_file_fails_the_hash_check(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "tokenizer_config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(BundleError, match="tokenizer_config.json: size"):
        TextEmbedder(copy)
    TextEmbedder(copy, verify=False)  # explicitly skipping the check still loads


def test_bundle_that_failed_parity_is_refused_unless_not_strict(tiny_bundle: Path,
                                                                tmp_path: Path) -> None:
    copy = tmp_path / "failed"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["parity"]["status"] = "failed"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="failed its parity check"):
        TextEmbedder(copy)
    assert TextEmbedder(copy, strict=False).encode(["x"]).shape == (1, 64)


def test_missing_manifest_means_incomplete_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a complete bundle"):
        TextEmbedder(tmp_path)


def test_length_batches_never_pad_short_texts_to_a_long_one() -> None:
    """One 8K text and seven 50-token texts: the long one runs alone, the rest together."""
    from qwen3emb.runtime.common import length_batches

    lengths = [50, 50, 8192, 50, 50, 50, 50, 50]
    assert length_batches(lengths, 32) == [[2], [0, 1, 3, 4, 5, 6, 7]]
    # The bound is on padded tokens: 4 rows of 2048 fit 8192, a fifth does not.
    assert [len(b) for b in length_batches([2048] * 5, 32)] == [4, 1]
    assert [len(b) for b in length_batches([50] * 40, 32)] == [32, 8]
    assert length_batches([9000, 9000], 32) == [[0], [1]]
    assert length_batches([9000, 9000], 32, max_tokens=None) == [[0, 1]]
