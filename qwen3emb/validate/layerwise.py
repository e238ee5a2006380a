"""The HuggingFace reference layer by layer, for checkpoints whose fp32 model does not fit.

transformers' own modules (embedding, ``Qwen3DecoderLayer``, RMSNorm, rotary embedding) run
in fp32, but only one decoder layer is resident at a time: its weights are read from the
safetensors shards, every text passes through it, and the hidden states wait for the next
layer. Peak memory is one layer plus the embedding table plus the texts' hidden states (about
3.5 GB for an 8B model), instead of the whole model (32 GB).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.errors import CheckpointError

logger = logging.getLogger(__name__)


class LayerwiseReference:
    """Same interface and results as :class:`~qwen3emb.validate.reference.ReferenceEmbedder`
    in fp32; texts are embedded in one pass over the layers (:meth:`prefetch`).

    Args:
        checkpoint: the checkpoint directory (``model_type: qwen3``).
    """

    precision = "float32 (layer by layer)"

    def __init__(self, checkpoint: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from qwen3emb.convert import family_for, load_checkpoint
        from qwen3emb.convert.weights import ShardedWeights

        self.torch = torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
            config = AutoConfig.from_pretrained(checkpoint)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"transformers cannot load the reference '{checkpoint}': {e}",
                                  hint="Pass the checkpoint the bundle was exported from") from e
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = AutoModel.from_config(config, dtype=torch.float32).eval()
        self.family = family_for(load_checkpoint(checkpoint))
        self.weights = ShardedWeights(self.family.checkpoint.weight_files)
        self.hidden_size = int(config.hidden_size)
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def token_ids(self, text: str, max_length: int) -> list[int]:
        """The reference tokenization (end token appended and last)."""
        from qwen3emb.validate.reference import reference_token_ids

        return reference_token_ids(self.tokenizer, text, max_length)

    def _load(self, module: Any, prefix: str) -> Any:
        """A copy of ``module`` (a meta submodule of the backbone) materialized from the shards.

        The copy is what holds the weights: ``to_empty`` works in place, and materializing the
        backbone's own submodule would keep every layer resident once the pass is over.
        """
        torch = self.torch
        module = copy.deepcopy(module)
        state = {}
        for name, _ in module.named_parameters():
            key = self.family.checkpoint_key(f"{prefix}{name}", self.weights)
            if key is None:
                raise CheckpointError(f"the checkpoint has no tensor for '{prefix}{name}'",
                                      hint="Pass the checkpoint the bundle was exported from")
            state[name] = torch.from_numpy(self.weights.load(key))
        module = module.to_empty(device="cpu")
        module.load_state_dict(state, strict=False)
        return module.eval()

    def prefetch(self, texts: Sequence[str], max_length: int) -> None:
        """Embed every text not cached yet, in one pass over the layers."""
        torch = self.torch
        todo = [t for t in dict.fromkeys(texts) if (t, max_length) not in self._cache]
        if not todo:
            return
        model = self.model
        ids = [torch.tensor([self.token_ids(t, max_length)]) for t in todo]
        embed = self._load(model.embed_tokens, "embed_tokens.")
        rotary = type(model.rotary_emb)(config=model.config)
        with torch.no_grad():
            hidden = [embed(x) for x in ids]
            del embed
            positions = [torch.arange(x.shape[1])[None] for x in ids]
            rope = [rotary(h, p) for h, p in zip(hidden, positions)]
            masks = [torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, None]
                     for x in ids]
            for index, meta_layer in enumerate(model.layers):
                layer = self._load(meta_layer, f"layers.{index}.")
                hidden = [layer(h, attention_mask=m, position_ids=p, position_embeddings=r)
                          for h, m, p, r in zip(hidden, masks, positions, rope)]
                hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
                del layer
                logger.debug("layer-by-layer reference: layer %d done", index)
            norm = self._load(model.norm, "norm.")
            for text, h in zip(todo, hidden):
                vec = norm(h)[0, -1].float()
                self._cache[(text, max_length)] = (vec / vec.norm().clamp_min(1e-12)).numpy()

    def embed(self, texts: Sequence[str], max_length: int, dimensions: int | None = None
              ) -> np.ndarray:
        """Reference embeddings [n, dim] (cut to ``dimensions`` and re-normalized if given)."""
        self.prefetch(texts, max_length)
        out = np.stack([self._cache[(t, max_length)] for t in texts]).astype(np.float32)
        if dimensions is not None:
            out = out[:, :dimensions]
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
