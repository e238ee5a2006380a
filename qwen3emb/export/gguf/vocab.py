"""The tokenizer of a Qwen3-Embedding checkpoint in the form llama.cpp reads from a GGUF.

llama.cpp tokenizes Qwen models as ``gpt2`` byte-level BPE with the ``qwen2`` pre-tokenizer;
it needs the token list, the merges and a type per token, all read here from
``tokenizer.json``. Added tokens keep their ids: ``special`` ones become CONTROL tokens, the
others USER_DEFINED, and ids the tokenizer does not use are filled with UNUSED ``[PAD<id>]``
tokens up to the model's vocabulary size (as llama.cpp's own converter does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType

from qwen3emb.constants import END_TOKEN
from qwen3emb.convert.random_checkpoint import QWEN2_SPLIT_PATTERN
from qwen3emb.errors import CheckpointError

TOKENIZER_MODEL = "gpt2"
PRE_TOKENIZER = "qwen2"
"""llama.cpp's name for the Qwen2/Qwen3 split pattern (``QWEN2_SPLIT_PATTERN``)."""


@dataclass(frozen=True)
class GGUFVocab:
    """Token strings, types and merges by id, and the id of the pooled end token."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    end_id: int
    normalizer: str | None
    """Unicode normal form applied before tokenizing (``NFC`` for Qwen), or ``None``."""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.types):
            raise ValueError("tokens and types differ in length")


def read_vocab(checkpoint_dir: Path, vocab_size: int) -> GGUFVocab:
    """Read ``tokenizer.json`` into the arrays llama.cpp expects.

    Args:
        checkpoint_dir: the Hugging Face checkpoint directory.
        vocab_size: rows of the embedding matrix; the token list is padded to this length.

    Returns:
        The vocabulary, with ``end_id`` the id of ``<|endoftext|>``.

    Raises:
        CheckpointError: no or unreadable ``tokenizer.json``, not a byte-level BPE with Qwen's
            pre-tokenizer, ids beyond ``vocab_size``, or no ``<|endoftext|>`` token.
    """
    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"'{checkpoint_dir}' has no tokenizer.json, which the GGUF vocabulary is built from",
            hint="Download the complete checkpoint (tokenizer.json is part of every "
                 "Qwen3-Embedding release)",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read '{path}': {e}",
                              hint="Download the checkpoint again") from e
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(
            f"'{path}' is not a BPE tokenizer (model type {model.get('type')!r})",
            hint="Qwen3-Embedding uses a byte-level BPE tokenizer; check the checkpoint",
        )
    _check_pre_tokenizer(path, data.get("pre_tokenizer"))
    normalizer = _normal_form(path, data.get("normalizer"))

    by_id: dict[int, tuple[str, int]] = {}
    for token, i in model["vocab"].items():
        by_id[int(i)] = (token, int(TokenType.NORMAL))
    end_id = None
    for added in data.get("added_tokens") or []:
        kind = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
        by_id[int(added["id"])] = (added["content"], kind)
        if added["content"] == END_TOKEN:
            end_id = int(added["id"])
    if end_id is None:
        raise CheckpointError(
            f"'{path}' has no {END_TOKEN} token, the end token Qwen3-Embedding pools",
            hint="Use an original Qwen3-Embedding tokenizer.json",
        )
    beyond = sorted(i for i in by_id if i >= vocab_size)
    if beyond:
        raise CheckpointError(
            f"'{path}' uses token ids up to {beyond[-1]}, but the model has only "
            f"{vocab_size} embedding rows",
            hint="tokenizer.json and the weights come from different checkpoints",
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", int(TokenType.UNUSED)))
        tokens.append(token)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFVocab(tokens=tokens, types=types, merges=merges, end_id=end_id,
                     normalizer=normalizer)


def _normal_form(path: Path, normalizer: Any) -> str | None:
    """llama.cpp skips the tokenizer's normalizer; the runtime applies it (Qwen: NFC)."""
    if normalizer is None:
        return None
    kind = normalizer.get("type") if isinstance(normalizer, dict) else None
    if kind not in ("NFC", "NFD", "NFKC", "NFKD"):
        raise CheckpointError(
            f"'{path}' has a {kind!r} normalizer, which the GGUF runtime cannot reproduce",
            hint="Only Qwen3-Embedding tokenizers (NFC) are supported for GGUF export",
        )
    return str(kind)


def _check_pre_tokenizer(path: Path, pre: Any) -> None:
    """Refuse a split pattern other than Qwen2's: llama.cpp would tokenize differently."""
    patterns: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "Split":
                pattern = node.get("pattern") or {}
                patterns.append(str(pattern.get("Regex", pattern.get("String", ""))))
            for child in node.get("pretokenizers") or []:
                walk(child)

    walk(pre)
    if patterns != [QWEN2_SPLIT_PATTERN]:
        raise CheckpointError(
            f"'{path}' does not use the Qwen2 pre-tokenizer split pattern, so llama.cpp's "
            f"'{PRE_TOKENIZER}' pre-tokenizer would split text differently",
            hint="Only Qwen3-Embedding tokenizers are supported for GGUF export",
        )
