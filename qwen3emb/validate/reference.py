"""The HuggingFace reference: the model-card recipe, computed by transformers itself."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.constants import END_TOKEN
from qwen3emb.errors import CheckpointError

logger = logging.getLogger(__name__)


def reference_query(task: str, query: str) -> str:
    """The model card's query format. Written out here, not taken from constants, so a typo
    there cannot hide."""
    return f"Instruct: {task}\nQuery:{query}"


def reference_token_ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """The reference tokenization of ``text`` by transformers' tokenizer.

    Raises:
        CheckpointError: the tokenizer does not append ``<|endoftext|>`` last.
    """
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    if not ids or ids[-1] != tokenizer.convert_tokens_to_ids(END_TOKEN):
        raise CheckpointError(
            f"the reference tokenizer does not end inputs with {END_TOKEN} "
            f"(last ids {ids[-3:]})",
            hint="Use the tokenizer released with the checkpoint "
            "(its post-processor appends it)",
        )
    return list(ids)


class ReferenceEmbedder:
    """``AutoModel`` + ``AutoTokenizer`` → last token of ``last_hidden_state`` → L2.

    Texts run one at a time, without padding, in fp32: the cleanest possible reference.
    Results are cached per (text, max_length).

    Args:
        checkpoint: the checkpoint directory.
        model: an already loaded backbone of the same checkpoint (optional).
        dtype: ``"float32"`` (the default) or ``"bfloat16"`` for models too big for fp32.
    """

    def __init__(self, checkpoint: Path, model: Any = None, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
            self.model = model if model is not None else AutoModel.from_pretrained(
                checkpoint, dtype=getattr(torch, dtype)).eval()
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"transformers cannot load the reference '{checkpoint}': {e}",
                                  hint="Pass the checkpoint the bundle was exported from") from e
        self.end_id = self.tokenizer.convert_tokens_to_ids(END_TOKEN)
        self.precision = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def token_ids(self, text: str, max_length: int) -> list[int]:
        """The reference tokenization; checks that the end token is appended and last."""
        return reference_token_ids(self.tokenizer, text, max_length)

    def prefetch(self, texts: Sequence[str], max_length: int) -> None:
        """Embed (and cache) ``texts``; the layer-by-layer reference does this in one pass."""
        self.embed(list(texts), max_length)

    def embed(self, texts: Sequence[str], max_length: int, dimensions: int | None = None
              ) -> np.ndarray:
        """Reference embeddings [n, dim] (cut to ``dimensions`` and re-normalized if given)."""
        torch = self.torch
        rows = []
        for text in texts:
            key = (text, max_length)
            if key not in self._cache:
                ids = torch.tensor([self.token_ids(text, max_length)])
                with torch.no_grad():
                    hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)
                                        ).last_hidden_state
                vec = hidden[0, -1].float()
                self._cache[key] = (vec / vec.norm().clamp_min(1e-12)).numpy()
            rows.append(self._cache[key])
        out = np.stack(rows).astype(np.float32)
        if dimensions is not None:
            out = out[:, :dimensions]
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
