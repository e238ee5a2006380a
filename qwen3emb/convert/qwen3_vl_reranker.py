"""Qwen3-VL-Reranker (``model_type: qwen3_vl``, exported with ``task: rerank``).

The released recipe (``Qwen3VLReranker`` in ``QwenLM/Qwen3-VL-Embedding``) runs
``Qwen3VLModel`` on a left-padded batch and applies a one-output linear head whose weight is
``lm_head[yes] − lm_head[no]`` to ``last_hidden_state[:, -1]``, then the sigmoid. The decoder
graph here computes the same at each row's last real token (any padding side) from the two
head rows; the vision graph, tracing, streaming, precisions and host preprocessing are the
VL embedder's, through the family hooks.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from qwen3emb import constants as C
from qwen3emb.convert import register
from qwen3emb.convert.qwen3_reranker import SCORE_HEAD, RerankHead
from qwen3emb.convert.qwen3_vl import Qwen3VLFamily
from qwen3emb.convert.qwen3_vl_modules import VLDecoderScorer
from qwen3emb.errors import CheckpointError
from qwen3emb.spec import GraphSpec, TensorSpec

logger = logging.getLogger(__name__)


class Qwen3VLRerankerFamily(RerankHead, Qwen3VLFamily):
    """Qwen3-VL-Reranker 2B / 8B: ``vision`` and ``decoder`` graphs; the decoder outputs
    ``score`` and ``logits`` instead of the embedding."""

    task = "rerank"
    embedding_table = "language_model.embed_tokens.weight"

    @property
    def tied_head(self) -> bool:
        top = self.config.get("tie_word_embeddings")
        return bool(self.text_config.get("tie_word_embeddings", False) if top is None else top)

    @property
    def default_max_length(self) -> int:
        return min(C.VL_RERANK_MAX_LENGTH, self.max_positions)

    def host_buffers(self, backbone: Any) -> dict[str, Any]:
        return {**super().host_buffers(backbone), SCORE_HEAD: self.score_weight()}

    def embedding_module(self, backbone: Any, dimensions: int | None = None) -> torch.nn.Module:
        return VLDecoderScorer(backbone.language_model, int(self.config["image_token_id"]),
                               int(self.config["video_token_id"]),
                               self.scorer_head(backbone, dimensions)).eval()

    def graph_specs(self, dim: int, opset: int) -> tuple[GraphSpec, GraphSpec]:
        vision, decoder = super().graph_specs(dim, opset)
        scorer = GraphSpec("decoder", inputs=decoder.inputs, outputs=(
            TensorSpec(C.SCORE, "float32", ("batch",)),
            TensorSpec(C.LOGITS, "float32", ("batch", "1"))), opset=opset, metric="score")
        return vision, scorer

    def check_tokenizer(self, tokenizer: Any) -> dict[str, Any]:
        """The embedder's checks, "yes" and "no" as one token each, and the ids the recipe's
        truncation keeps (the tokenizer's ``all_special_ids``). The recipe never cuts the last
        five ids, whatever they are; in Qwen's vocabulary they are ``<|im_end|>\n<|im_start|>
        assistant\n``."""
        info = super().check_tokenizer(tokenizer)
        yes, no = self.token_ids()
        end_id = tokenizer.token_to_id(C.END_TOKEN)
        info.update({"yes_token": C.RERANK_YES, "yes_token_id": yes, "no_token": C.RERANK_NO,
                     "no_token_id": no, "special_ids": self._special_ids(),
                     "pad_token_id": int(end_id if end_id is not None else 0),
                     "rule": (f"prompt encoded whole; all but its last {C.VL_RERANK_TAIL_TOKENS} "
                              "tokens cut to max_length keeping every special id (the first "
                              "other tokens kept); score at the last real token")})
        return info

    def _special_ids(self) -> list[int]:
        """``all_special_ids`` of the checkpoint's tokenizer, as transformers loads it: the
        tokens the released truncation never drops (chat and vision placeholders)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.checkpoint.path)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"transformers cannot load the tokenizer of "
                                  f"'{self.checkpoint.path}': {e}",
                                  hint="Use the checkpoint's original tokenizer files") from e
        return sorted(int(i) for i in tokenizer.all_special_ids)

    def manifest_sections(self, out_dim: int, *, onnx: bool, gguf: bool) -> dict[str, Any]:
        yes, no = self.token_ids()
        return {
            "rerank": {
                "system": C.VL_RERANK_SYSTEM, "default_instruction": C.VL_RERANK_INSTRUCTION,
                "instruction_prefix": "<Instruct>: ", "query_prefix": C.VL_RERANK_QUERY_PREFIX,
                "document_prefix": C.VL_RERANK_DOCUMENT_PREFIX,
                "content_order": ["video", "image", "text"], "empty_input": C.VL_EMPTY_TEXT,
                "tail_tokens": C.VL_RERANK_TAIL_TOKENS, "yes_token_id": yes, "no_token_id": no,
                "pooling": "last_token",
                "score": "sigmoid(logit_yes - logit_no) at the last real token",
                "outputs": {"score": "[batch] in (0, 1)", "logits": "[batch, 1], pre-sigmoid"},
            },
            "vision": {**self._vision_facts(), "decoder_hidden_size": self.embedding_dim},
        }

    def gguf_options(self) -> dict[str, Any]:
        from qwen3emb.errors import UnsupportedModelError

        raise UnsupportedModelError("no GGUF export for Qwen3-VL rerankers: llama.cpp has no "
                                    "rank pooling for its Qwen3-VL models",
                                    hint="Use --format onnx (VLReranker runs the bundle)")


register("qwen3_vl", task="rerank")(Qwen3VLRerankerFamily)
