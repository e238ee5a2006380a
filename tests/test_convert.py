"""Checkpoint discovery, family detection and the errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwen3emb.convert import family_for, load_checkpoint
from qwen3emb.convert.random_checkpoint import REAL_VOCAB_SIZE, build_tokenizer
from qwen3emb.errors import CheckpointError, UnsupportedModelError


def _copy_with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_qwen3_checkpoint_is_detected_as_text_family(tiny_checkpoint: Path) -> None:
    family = family_for(load_checkpoint(tiny_checkpoint))
    assert family.model_type == "qwen3"
    assert family.embedding_dim == 64
    assert family.mrl_min == 32


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "nope")
    assert "local directory" in info.value.one_line()


def test_file_instead_of_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tmp_path / "f")


def test_hub_failure_names_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not download 'no-such-org/no-such-model'"):
        load_checkpoint("no-such-org/no-such-model")


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_non_qwen3_config_names_model_type_and_supported_ones(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy_with_config(tiny_checkpoint, tmp_path / "llama", model_type="llama")
    with pytest.raises(UnsupportedModelError) as info:
        family_for(load_checkpoint(ckpt))
    assert "'llama'" in info.value.message
    assert "qwen3" in info.value.hint


def test_qwen3_vl_config_without_sub_configs_names_missing_keys(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy_with_config(tiny_checkpoint, tmp_path / "vl", model_type="qwen3_vl")
    with pytest.raises(CheckpointError, match="lacks .*vision_config.patch_size"):
        family_for(load_checkpoint(ckpt))


def test_corrupt_safetensors_is_rejected(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy_with_config(tiny_checkpoint, tmp_path / "bad")
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(ckpt)


def test_truncated_safetensors_is_rejected(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy_with_config(tiny_checkpoint, tmp_path / "cut")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|not a readable"):
        load_checkpoint(ckpt)


def test_full_vocabulary_tokenizer_puts_special_tokens_at_real_ids(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    end_id = build_tokenizer(tmp_path, vocab_size=REAL_VOCAB_SIZE)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert end_id == 151643
    assert tok.get_vocab_size() == REAL_VOCAB_SIZE
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.token_to_id("<|image_pad|>") == 151655
    assert tok.encode("hello world").ids[-1] == 151643
