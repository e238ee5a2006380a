"""Qwen3-Reranker (text): the Qwen3 backbone → last real token → (w_yes − w_no) · h → sigmoid.

The model card scores a pair as ``exp(log_softmax([logit_no, logit_yes])[1])`` at the last
position of a left-padded batch, which is ``sigmoid(logit_yes − logit_no)``. The graph computes
exactly that difference from two rows of the LM head, at each input's last real token (any
padding side), and never the vocabulary-wide head. Everything else (tracing, streaming,
shallow replication, precisions) is the embedder's, through the family hooks.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from qwen3emb.constants import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    RERANK_INSTRUCTION,
    RERANK_MAX_LENGTH,
    RERANK_NO,
    RERANK_PREFIX,
    RERANK_SUFFIX,
    RERANK_TEMPLATE,
    RERANK_YES,
)
from qwen3emb.convert import register
from qwen3emb.convert.qwen3 import Qwen3Embedder, Qwen3Family
from qwen3emb.errors import CheckpointError, InputError
from qwen3emb.spec import RerankGraphSpec

logger = logging.getLogger(__name__)

SCORE_HEAD = "score_head"
"""The graph's one head weight, [hidden, 1]: LM-head row of "yes" minus row of "no"."""


class Qwen3Scorer(Qwen3Embedder):
    """``input_ids``, ``attention_mask`` [batch, seq] → ``score`` [batch], ``logits`` [batch, 1].

    The embedder's pooled final-norm hidden state (last real token, the last layer computed
    for that row only) times :data:`SCORE_HEAD`.
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.Tensor | None = None, *,
                 pooled_last_layer: bool = True) -> None:
        super().__init__(backbone, pooled_last_layer=pooled_last_layer)
        hidden = int(backbone.config.hidden_size)
        device = next(backbone.parameters()).device
        weight = (torch.empty((hidden, 1), device=device) if head is None
                  else head.reshape(hidden, 1).float())
        self.score_head = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.pooled_hidden(input_ids, attention_mask).float() @ self.score_head
        return torch.sigmoid(logits)[:, 0], logits


def task_for(source: str, task: str | None) -> tuple[str, str]:
    """The task of an export and why: ``(task, "flag" | "name")``.

    Args:
        source: the hub id or directory the user named.
        task: ``export --task`` (``None``: from the name).

    Raises:
        InputError: an unknown task.
    """
    from qwen3emb.constants import TASKS

    if task is not None:
        if task not in TASKS:
            raise InputError(f"unknown task '{task}'",
                             hint=f"Use --task {' or --task '.join(TASKS)}")
        return task, "flag"
    name = str(source).rstrip("/\\").lower()
    return ("rerank" if "reranker" in name else "embed"), "name"


class RerankHead:
    """The score head of a Qwen3 reranker, read from its checkpoint: the LM-head rows of "yes"
    and "no" (the embedding table's where the head is tied). Shared by the text and the VL
    reranker families."""

    checkpoint: Any
    config: dict[str, Any]
    checkpoint_key: Any  # the family's (Family.checkpoint_key)
    embedding_table = "embed_tokens.weight"
    """The backbone's embedding table (tied heads read their rows from it)."""

    @property
    def tied_head(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def token_ids(self) -> tuple[int, int]:
        """The ids of "yes" and "no" in the checkpoint's tokenizer.

        Raises:
            CheckpointError: either is not one token of the vocabulary.
        """
        from tokenizers import Tokenizer

        path = self.checkpoint.path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"'{self.checkpoint.path}' has no tokenizer.json",
                                  hint="Use the checkpoint's original tokenizer files")
        tokenizer = Tokenizer.from_file(str(path))
        ids = []
        for token in (RERANK_YES, RERANK_NO):
            found = tokenizer.token_to_id(token)
            if found is None:
                raise CheckpointError(
                    f"tokenizer.json has no single token {token!r}, so the reranker's "
                    f"{RERANK_YES}/{RERANK_NO} score is undefined",
                    hint="Qwen3-Reranker's tokenizer has both; use that tokenizer")
            ids.append(int(found))
        return ids[0], ids[1]

    def head_rows(self) -> np.ndarray:
        """LM-head rows of "yes" and "no", [2, hidden] fp32, read from the shards.

        Tied checkpoints (the 0.6B) read them from the embedding table.

        Raises:
            CheckpointError: an untied checkpoint without ``lm_head.weight``.
        """
        from qwen3emb.convert.weights import ShardedWeights

        shards = ShardedWeights(self.checkpoint.weight_files)
        tied = self.tied_head
        key = None if tied else self.checkpoint_key("lm_head.weight", shards)
        if key is None and not tied:
            raise CheckpointError(
                f"'{self.checkpoint.path}' has no lm_head.weight and config.json does not tie "
                "the head to the embedding table", hint="A reranker checkpoint needs its LM head")
        if key is None:
            key = self.checkpoint_key(self.embedding_table, shards)
        if key is None:
            raise CheckpointError(f"'{self.checkpoint.path}' has no embedding table",
                                  hint="The checkpoint is incomplete")
        return shards.load_rows(key, list(self.token_ids()))

    def score_weight(self) -> np.ndarray:
        """:data:`SCORE_HEAD`: ``lm_head[yes] − lm_head[no]`` as [hidden, 1] fp32."""
        rows = self.head_rows()
        return (rows[0] - rows[1]).astype(np.float32).reshape(-1, 1)

    def scorer_head(self, backbone: Any, dimensions: int | None) -> torch.Tensor | None:
        """The score head for a scorer module over ``backbone``: ``None`` for a meta backbone
        (tracing; the weight comes from :meth:`host_buffers`).

        Raises:
            InputError: ``dimensions`` given (a reranker has no embedding to cut).
        """
        if dimensions is not None:
            raise InputError("a reranker has no embedding width to cut",
                             hint="Drop --dimensions for reranker exports")
        if next(backbone.parameters()).device.type == "meta":
            return None
        return torch.from_numpy(self.score_weight())

    def _token_id(self, token: str) -> int:
        from tokenizers import Tokenizer

        found = Tokenizer.from_file(str(self.checkpoint.path / "tokenizer.json")
                                    ).token_to_id(token)
        if found is None:
            raise CheckpointError(f"tokenizer.json has no {token} token",
                                  hint="This is not a Qwen3 tokenizer")
        return int(found)


class Qwen3RerankerFamily(RerankHead, Qwen3Family):
    """Qwen3-Reranker 0.6B / 4B / 8B (``model_type: qwen3``, exported with ``task: rerank``)."""

    task = "rerank"
    interop_tools = ("cross-encoder", "transformers.js")

    @property
    def default_max_length(self) -> int:
        return min(RERANK_MAX_LENGTH, self.max_positions)

    def host_buffers(self, backbone: Any) -> dict[str, Any]:
        return {**super().host_buffers(backbone), SCORE_HEAD: self.score_weight()}

    def embedding_module(self, backbone: Any, dimensions: int | None = None) -> torch.nn.Module:
        return Qwen3Scorer(backbone, self.scorer_head(backbone, dimensions),
                           pooled_last_layer=self.pooled_last_layer).eval()

    def graph_specs(self, dim: int, opset: int) -> tuple[RerankGraphSpec]:
        return (RerankGraphSpec(opset=opset),)

    def check_tokenizer(self, tokenizer: Any) -> dict[str, Any]:
        """The prompt's tokens must exist, "yes" and "no" must be one token each; records what
        the post-processor appends to the content (kept, as the model card's call keeps it)."""
        from qwen3emb.constants import END_TOKEN

        for token in (IM_START_TOKEN, IM_END_TOKEN, END_TOKEN):
            if tokenizer.token_to_id(token) is None:
                raise CheckpointError(f"tokenizer.json has no {token} token",
                                      hint="This is not a Qwen3 tokenizer")
        yes, no = self.token_ids()
        plain = tokenizer.encode("a", add_special_tokens=False).ids
        full = tokenizer.encode("a").ids
        appended = full[len(plain):] if full[:len(plain)] == plain else []
        prepended = full[:len(full) - len(plain) - len(appended)]
        end_id = int(tokenizer.token_to_id(END_TOKEN))
        return {"yes_token": RERANK_YES, "yes_token_id": yes, "no_token": RERANK_NO,
                "no_token_id": no, "pad_token_id": end_id, "end_token": END_TOKEN,
                "end_token_id": end_id, "content_appended_ids": appended,
                "content_prepended_ids": prepended,
                "truncation_side": self._truncation_side(),
                "rule": ("prefix and suffix encoded without special tokens and never cut; the "
                         "content encoded with the post-processor and truncated (longest first) "
                         "to max_length minus prefix and suffix; score at the last real token")}

    def _truncation_side(self) -> str:
        path = self.checkpoint.path / "tokenizer_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            config = {}
        side = str(config.get("truncation_side", "right"))
        if side not in ("left", "right"):
            raise CheckpointError(f"tokenizer_config.json has truncation_side {side!r}",
                                  hint="Use 'left' or 'right'")
        return side

    def pair_templates(self) -> tuple[str, str]:
        """The card's prompt as one string pair, for tools that tokenize ``(query, document)``
        pairs themselves: ``(query_template, document_template)``.

        ``query_template`` (``{instruction}``, ``{query}``) is the prefix and the content up to
        the document; ``document_template`` (``{document}``) the rest and the suffix. Whatever
        the tokenizer's post-processor puts around the content is written in as token text, so
        the pair tokenized *without* special tokens gives the card's ids exactly.
        """
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.checkpoint.path / "tokenizer.json"))
        info = self.check_tokenizer(tokenizer)

        def text(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=False)

        split = RERANK_TEMPLATE.index("<Document>")
        return (RERANK_PREFIX + text(info["content_prepended_ids"]) + RERANK_TEMPLATE[:split],
                RERANK_TEMPLATE[split:] + text(info["content_appended_ids"]) + RERANK_SUFFIX)

    def loader_config(self) -> dict[str, Any]:
        """``config.json`` as a one-label sequence classifier whose ``logits`` is the graph's
        (sentence-transformers' CrossEncoder applies the sigmoid; transformers.js does for
        ``multi_label_classification``)."""
        from qwen3emb.constants import END_TOKEN

        config = dict(self.config)
        config.update({
            "architectures": ["Qwen3ForSequenceClassification"],
            "num_labels": 1, "id2label": {"0": "relevance"}, "label2id": {"relevance": 0},
            "problem_type": "multi_label_classification",
            "pad_token_id": int(config.get("pad_token_id") or self._token_id(END_TOKEN)),
            "sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Sigmoid"},
        })
        return config

    def manifest_sections(self, out_dim: int, *, onnx: bool, gguf: bool) -> dict[str, Any]:
        yes, no = self.token_ids()
        query_template, document_template = self.pair_templates()
        return {
            "rerank": {
                "prefix": RERANK_PREFIX, "suffix": RERANK_SUFFIX, "template": RERANK_TEMPLATE,
                "default_instruction": RERANK_INSTRUCTION, "yes_token_id": yes,
                "no_token_id": no, "pooling": "last_token",
                "query_template": query_template, "document_template": document_template,
                "score": "sigmoid(logit_yes - logit_no) at the last real token",
                "outputs": {"score": "[batch] in (0, 1)", "logits": "[batch, 1], pre-sigmoid"},
            },
        }

    def prompts(self) -> dict[str, str]:
        return {}

    def gguf_options(self) -> dict[str, Any]:
        """The GGUF's rank head and llama.cpp's ``rerank`` template: the card's prompt with the
        default instruction, whatever the post-processor puts around the content included (as
        token text, which llama-server parses as special tokens)."""
        from qwen3emb.export.gguf.text import RankHead

        yes, no = self.token_ids()
        query_template, document_template = self.pair_templates()
        template = (query_template.format(instruction=RERANK_INSTRUCTION, query="{query}")
                    + document_template)
        return {"rank_head": RankHead(yes, no, template)}


register("qwen3", task="rerank")(Qwen3RerankerFamily)
