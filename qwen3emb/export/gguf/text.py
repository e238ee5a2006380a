"""GGUF export of text Qwen3-Embedding and Qwen3-Reranker checkpoints, for llama.cpp
(shared/CONTRACT.md, GGUF).

Float and q8_0 files are written by gguf-py's ``GGUFWriter`` while the weights stream from the
safetensors shards one tensor at a time. K-quants are made by llama.cpp's own quantizer
(``llama_model_quantize``, through the binding in the ``gguf`` extra) from an f32 GGUF. Every
file is written under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    PoolingType,
    get_tensor_name_map,
)

from qwen3emb.errors import CheckpointError, UnsupportedModelError
from qwen3emb.export.gguf.common import (
    DecoderConfig,
    GGUFType,
    _read_json,
    _storage,
    _Tensor,
    add_decoder_metadata,
    check_types,
    prepare_output,
    write_models,
    write_tensors,
)
from qwen3emb.export.gguf.vocab import GGUFVocab, read_vocab

logger = logging.getLogger(__name__)


ARCH = MODEL_ARCH.QWEN3

RANK_HEAD = f"{TENSOR_NAMES[MODEL_TENSOR.CLS_OUT]}.weight"
"""llama.cpp's classifier output, [2, hidden] in HF order: rank pooling multiplies the last
token's final-norm state by it and, for qwen3, takes the softmax of the two outputs."""

RANK_LABELS = ("yes", "no")
"""``qwen3.classifier.output_labels``: llama-server's rerank score is the first output."""


@dataclass(frozen=True)
class RankHead:
    """What makes a qwen3 GGUF a reranker for llama.cpp's rank pooling.

    The head's rows are ``lm_head[yes] − lm_head[no]`` and zero, so the softmax's first output
    is ``sigmoid(logit_yes − logit_no)``, the model card's score, with the difference taken in
    float32 once (llama.cpp's own converter stores both rows and lets the quantizer round
    each). The head is always stored f32.
    """

    yes_id: int
    no_id: int
    template: str
    """llama.cpp's ``rerank`` chat template: the whole prompt, ``{query}`` and ``{document}``
    left for llama-server to fill (the model card's default instruction is in it)."""


@dataclass(frozen=True)
class Qwen3TextConfig(DecoderConfig):
    """The config.json keys a qwen3 GGUF needs."""

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: Path) -> Qwen3TextConfig:
        """Build from a parsed config.json.

        Raises:
            UnsupportedModelError: not a plain ``qwen3`` text model.
            CheckpointError: a required key is missing.
        """
        model_type = config.get("model_type")
        if model_type != "qwen3":
            raise UnsupportedModelError(
                f"'{where}' has model_type {model_type!r}; GGUF export supports 'qwen3' "
                "(Qwen3-Embedding) only",
                hint="Export Qwen3-VL-Embedding checkpoints to ONNX",
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"'{where}' uses rope_type {rope.get('rope_type')!r}; only the default is exported",
                hint="Qwen3-Embedding checkpoints use default RoPE; check config.json",
            )
        try:
            return cls(**DecoderConfig.fields(config))
        except KeyError as e:
            raise CheckpointError(f"'{where}' lacks the key {e}",
                                  hint="Download the checkpoint's config.json again") from e


def export_gguf(checkpoint_dir: Path, out_dir: Path, types: Sequence[str], *,
                max_length: int | None = None, progress: bool = False,
                rank_head: RankHead | None = None) -> list[dict[str, Any]]:
    """Write ``out_dir/model-<type>.gguf`` for each requested type.

    Args:
        checkpoint_dir: a Hugging Face Qwen3-Embedding checkpoint (config.json, safetensors,
            tokenizer.json).
        out_dir: where the files go (created).
        types: names from ``GGUF_TYPES`` (any case): f32, f16, bf16, q8_0, q4_k_m, q5_k_m,
            q6_k.
        max_length: tokens kept per input by the runtime, stored as ``qwen3emb.max_length``;
            default max_position_embeddings.
        progress: show a progress bar per file (needs tqdm).
        rank_head: write a reranker (rank pooling, :data:`RANK_HEAD`, the ``rerank``
            template) instead of an embedder.

    Returns:
        One dict per file, in the order of ``types``: ``path`` (relative to ``out_dir``),
        ``kind`` "gguf", ``role`` "model", ``precision`` and ``scheme``.

    Raises:
        InputError: no types, an unknown type, or max_length out of range.
        CheckpointError: missing or unreadable config, weights or tokenizer.json.
        UnsupportedModelError: config.json is not a qwen3 text model.
        MissingDependencyError: a k-quant was requested without the ``gguf`` extra.
        OutputError: ``out_dir`` cannot be written.
    """
    wanted = check_types(types)
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    raw = _read_json(checkpoint_dir / "config.json")
    config = Qwen3TextConfig.from_dict(raw, checkpoint_dir)
    max_length = prepare_output(out_dir, wanted, config.max_position_embeddings, max_length)
    vocab = read_vocab(checkpoint_dir, config.vocab_size)
    tensors = _list_tensors(checkpoint_dir, config, rank_head,
                            tied=bool(raw.get("tie_word_embeddings", False)))
    written = write_models(out_dir, wanted, lambda path, g: _write_gguf(
        path, g, config, vocab, tensors, max_length, progress, rank_head))
    return [{"path": written[t.name].name, "kind": "gguf", "role": "model",
             "precision": t.name, "scheme": t.scheme} for t in wanted]


def _list_tensors(checkpoint_dir: Path, config: Qwen3TextConfig,
                  rank_head: RankHead | None = None, *, tied: bool = False) -> list[_Tensor]:
    """Map every checkpoint tensor to its GGUF name from the safetensors headers alone (and,
    for a reranker, :data:`RANK_HEAD` from the LM head, or the embedding table when tied)."""
    from safetensors import safe_open

    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({checkpoint_dir / f for f in _read_json(index)["weight_map"].values()})
    else:
        shards = sorted(checkpoint_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"'{checkpoint_dir}' has no .safetensors weights",
                              hint="Download the checkpoint's model.safetensors")
    names = get_tensor_name_map(ARCH, config.num_hidden_layers)
    tensors: list[_Tensor] = []
    unknown: list[str] = []
    heads: dict[str, Path] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if hf_name in ("lm_head.weight", "model.lm_head.weight"):
                    heads[hf_name] = shard
                    continue  # the hidden state (an embedder) or two rows (a reranker)
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    unknown.append(hf_name)
                    continue
                shape = tuple(int(d) for d in f.get_slice(hf_name).get_shape())
                tensors.append(_Tensor(hf_name, gguf_name, shard, shape))
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} tensors have no qwen3 GGUF name, e.g. {unknown[:3]}",
            hint="This does not look like a Qwen3-Embedding checkpoint",
        )
    embd = next((t for t in tensors if t.gguf_name == "token_embd.weight"), None)
    if embd is None or embd.shape != (config.vocab_size, config.hidden_size):
        raise CheckpointError(
            f"embed_tokens has shape {embd.shape if embd else None}, config.json says "
            f"({config.vocab_size}, {config.hidden_size})",
            hint="config.json and the weights come from different checkpoints",
        )
    if rank_head is not None:
        tensors.append(_rank_head_tensor(rank_head, embd, heads, tied, config))
    return tensors


def _rank_head_tensor(head: RankHead, embd: _Tensor, heads: dict[str, Path], tied: bool,
                      config: Qwen3TextConfig) -> _Tensor:
    """:data:`RANK_HEAD` from the LM head's "yes" and "no" rows (the embedding table's when
    the head is tied to it).

    Raises:
        CheckpointError: an untied checkpoint without ``lm_head.weight``, or token ids
            outside the vocabulary.
    """
    name = next(iter(heads), None)
    if tied or name is None:
        if not tied:
            raise CheckpointError("the checkpoint has no lm_head.weight and config.json does not "
                                  "tie the head to the embedding table",
                                  hint="A reranker checkpoint needs its LM head")
        name, shard = embd.hf_name, embd.shard
    else:
        shard = heads[name]
    if not all(0 <= i < config.vocab_size for i in (head.yes_id, head.no_id)):
        raise CheckpointError(f"token ids {head.yes_id}/{head.no_id} are outside the "
                              f"vocabulary of {config.vocab_size}",
                              hint="The tokenizer and config.json do not belong together")

    def rows(data: np.ndarray) -> np.ndarray:
        out = np.zeros((2, data.shape[1]), dtype=np.float32)
        out[0] = data[head.yes_id].astype(np.float64) - data[head.no_id]
        return out

    return _Tensor(name, RANK_HEAD, shard, (2, config.hidden_size), rows)


def _write_gguf(path: Path, gtype: GGUFType, config: Qwen3TextConfig, vocab: GGUFVocab,
                tensors: list[_Tensor], max_length: int, progress: bool,
                rank_head: RankHead | None = None) -> None:
    """Write one GGUF with gguf-py: header and tensor table first, then the data streamed."""
    writer = GGUFWriter(None, MODEL_ARCH_NAMES[ARCH])
    _add_metadata(writer, gtype, config, vocab, max_length, rank_head)
    storage = {t.gguf_name: GGMLQuantizationType.F32 if t.gguf_name == RANK_HEAD
               else _storage(t, gtype) for t in tensors}
    write_tensors(path, writer, tensors, storage, desc=f"GGUF {gtype.name}", progress=progress)


def _add_metadata(writer: GGUFWriter, gtype: GGUFType, config: Qwen3TextConfig,
                  vocab: GGUFVocab, max_length: int, rank_head: RankHead | None) -> None:
    add_decoder_metadata(writer, gtype, config, vocab, max_length,
                         pooling=PoolingType.LAST if rank_head is None else PoolingType.RANK)
    writer.add_bos_token_id(vocab.end_id)
    writer.add_eos_token_id(vocab.end_id)
    writer.add_pad_token_id(vocab.end_id)
    writer.add_add_bos_token(False)
    if rank_head is None:
        # llama.cpp appends <|endoftext|> itself only when add_eos_token is true.
        writer.add_add_eos_token(True)
        return
    # A reranker's prompt ends with the suffix, whatever the content's post-processor added
    # (that is in the template): nothing may follow it.
    writer.add_add_eos_token(False)
    writer.add_classifier_output_labels(list(RANK_LABELS))
    writer.add_chat_template([{"name": "rerank", "template": rank_head.template}])
