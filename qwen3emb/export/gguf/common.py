"""What every GGUF writer of this package shares: the types, the decoder hyperparameters,
streaming tensors from the shards into gguf-py's ``GGUFWriter``, llama.cpp's quantizer, and
atomic file replacement (every file is written under a temporary name and renamed into place
only when complete)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    PoolingType,
)
from gguf.quants import quant_shape_to_byte_shape, quantize

from qwen3emb.errors import CheckpointError, InputError, OutputError
from qwen3emb.export.gguf.vocab import PRE_TOKENIZER, TOKENIZER_MODEL, GGUFVocab

logger = logging.getLogger(__name__)


MAX_LENGTH_KEY = "qwen3emb.max_length"
"""Our own metadata key: the truncation length the runtime applies (llama.cpp ignores it)."""


NORMALIZER_KEY = "qwen3emb.normalizer"
"""Our own metadata key: the Unicode normal form the runtime applies before tokenizing."""


@dataclass(frozen=True)
class GGUFType:
    """One ``--gguf-type``: how matrices are stored. 1-D tensors (norms) always stay f32."""

    name: str
    scheme: str
    file_type: LlamaFileType
    """``general.file_type``; for k-quants also the ``llama_ftype`` handed to the quantizer."""
    weights: GGMLQuantizationType | None
    """Type gguf-py writes matrices in; ``None`` means llama.cpp's quantizer makes the file."""


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("f32", "float32 everywhere", LlamaFileType.ALL_F32, GGMLQuantizationType.F32),
    GGUFType("f16", "float16 matrices, float32 norms", LlamaFileType.MOSTLY_F16,
             GGMLQuantizationType.F16),
    GGUFType("bf16", "bfloat16 matrices, float32 norms", LlamaFileType.MOSTLY_BF16,
             GGMLQuantizationType.BF16),
    GGUFType("q8_0", "Q8_0 matrices (blocks of 32, gguf-py), float32 norms",
             LlamaFileType.MOSTLY_Q8_0, GGMLQuantizationType.Q8_0),
    GGUFType("q4_k_m", "llama.cpp Q4_K_M mix (llama_model_quantize from f32)",
             LlamaFileType.MOSTLY_Q4_K_M, None),
    GGUFType("q5_k_m", "llama.cpp Q5_K_M mix (llama_model_quantize from f32)",
             LlamaFileType.MOSTLY_Q5_K_M, None),
    GGUFType("q6_k", "llama.cpp Q6_K (llama_model_quantize from f32)",
             LlamaFileType.MOSTLY_Q6_K, None),
)}


@dataclass(frozen=True)
class DecoderConfig:
    """The Qwen3 decoder keys every GGUF of this project needs; unknown keys are ignored."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float

    @staticmethod
    def fields(text: dict[str, Any]) -> dict[str, Any]:
        """The decoder fields from a (text) config dict.

        Raises:
            KeyError: a required key is missing.
        """
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        heads = int(text["num_attention_heads"])
        return {
            "vocab_size": int(text["vocab_size"]),
            "hidden_size": int(text["hidden_size"]),
            "intermediate_size": int(text["intermediate_size"]),
            "num_hidden_layers": int(text["num_hidden_layers"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(text.get("num_key_value_heads") or heads),
            "head_dim": int(text.get("head_dim") or int(text["hidden_size"]) // heads),
            "max_position_embeddings": int(text["max_position_embeddings"]),
            "rms_norm_eps": float(text["rms_norm_eps"]),
            "rope_theta": float(rope.get("rope_theta") or text["rope_theta"]),
        }


def prepare_output(out_dir: Path, wanted: Sequence[GGUFType], limit: int,
                   max_length: int | None, default: int | None = None) -> int:
    """Resolve ``max_length`` (unset: ``default`` capped at ``limit``, else ``limit``), check
    the llama.cpp binding when k-quants are wanted, and create ``out_dir`` — all before
    anything is written.

    Raises:
        InputError: max_length outside 2..limit.
        MissingDependencyError: a k-quant without the ``gguf`` extra.
        OutputError: ``out_dir`` cannot be created.
    """
    if max_length is None:
        max_length = limit if default is None else min(default, limit)
    elif isinstance(max_length, bool) or not 1 < int(max_length) <= limit:
        raise InputError(f"max_length={max_length} is outside 2..{limit} for this checkpoint",
                         hint=f"Choose at most max_position_embeddings ({limit})")
    if any(t.weights is None for t in wanted):
        from qwen3emb.runtime._llama import llama_library

        llama_library()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create '{out_dir}': {e}",
                          hint="Choose a writable output directory") from e
    return int(max_length)


def write_models(out_dir: Path, wanted: Sequence[GGUFType],
                 write: Callable[[Path, GGUFType], None]) -> dict[str, Path]:
    """Write ``model-<type>.gguf`` for each type, atomically.

    Types gguf-py writes directly go through ``write``; k-quants are made by llama.cpp's
    quantizer from the f32 file (written to a scratch file first when f32 was not asked for).

    Returns:
        Type name → written path.
    """
    written: dict[str, Path] = {}
    for gtype in [t for t in wanted if t.weights is not None]:
        path = out_dir / f"model-{gtype.name}.gguf"
        _atomic(path, lambda tmp, g=gtype: write(tmp, g))
        written[gtype.name] = path
    kquants = [t for t in wanted if t.weights is None]
    if not kquants:
        return written
    source = written.get("f32")
    scratch = out_dir / ".kquant-source-f32.gguf.partial"
    try:
        if source is None:
            try:
                write(scratch, GGUF_TYPES["f32"])
            except OSError as e:
                raise OutputError(f"writing the f32 source for k-quants failed: {e}",
                                  hint="Check free disk space (4 bytes per parameter)") from e
            source = scratch
        for gtype in kquants:
            path = out_dir / f"model-{gtype.name}.gguf"
            _atomic(path, lambda tmp, g=gtype, s=source: _llama_quantize(s, tmp, g))
            written[gtype.name] = path
    finally:
        scratch.unlink(missing_ok=True)
    return written


def check_types(types: Sequence[str]) -> list[GGUFType]:
    names = [str(n).lower() for n in ([types] if isinstance(types, str) else types)]
    if not names:
        raise InputError("no GGUF types requested", hint=f"Choose from {', '.join(GGUF_TYPES)}")
    unknown = [n for n in names if n not in GGUF_TYPES]
    if unknown:
        raise InputError(f"unknown GGUF type {', '.join(map(repr, unknown))}",
                         hint=f"Supported types: {', '.join(GGUF_TYPES)}")
    return [GGUF_TYPES[n] for n in dict.fromkeys(names)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist",
                              hint="Pass a Hugging Face checkpoint directory with config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read '{path}': {e}",
                              hint="Download the checkpoint again") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' is not a JSON object", hint="Download it again")
    return data


@dataclass(frozen=True)
class _Tensor:
    hf_name: str
    gguf_name: str
    shard: Path
    shape: tuple[int, ...]
    """Shape as written to the GGUF (after ``transform``)."""
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    """Applied to the float32 checkpoint tensor before it is written (e.g. a slice)."""


def _storage(t: _Tensor, gtype: GGUFType) -> GGMLQuantizationType:
    """llama.cpp keeps 1-D tensors in f32; q8_0 needs rows that are whole blocks of 32."""
    assert gtype.weights is not None
    if len(t.shape) == 1:
        return GGMLQuantizationType.F32
    if gtype.weights == GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
        logger.info("%s: row length %d is not a multiple of 32, stored as f16",
                    t.gguf_name, t.shape[-1])
        return GGMLQuantizationType.F16
    return gtype.weights


def _stream(tensors: list[_Tensor]) -> Iterator[tuple[_Tensor, np.ndarray]]:
    """Yield each tensor as float32 numpy, one at a time, opening each shard once."""
    import torch
    from safetensors import safe_open

    for shard in dict.fromkeys(t.shard for t in tensors):
        with safe_open(shard, framework="pt") as f:
            for t in (t for t in tensors if t.shard == shard):
                data = f.get_tensor(t.hf_name).to(torch.float32).numpy()
                yield t, (t.transform(data) if t.transform is not None else data)


def write_tensors(path: Path, writer: GGUFWriter, tensors: list[_Tensor],
                  storage: dict[str, GGMLQuantizationType], *, desc: str,
                  progress: bool) -> None:
    """Write ``writer``'s metadata, then ``tensors`` streamed one at a time in ``storage`` types.

    Shared by every GGUF this package writes; the caller has added all metadata already.
    """
    for t in tensors:
        qtype = storage[t.gguf_name]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
            nbytes = int(np.prod(t.shape)) * dtype.itemsize
            writer.add_tensor_info(t.gguf_name, t.shape, dtype, nbytes)
        else:
            byte_shape = quant_shape_to_byte_shape(t.shape, qtype)
            writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8),
                                   int(np.prod(byte_shape)), raw_dtype=qtype)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tensors), desc=desc, unit="tensor")
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, data in _stream(tensors):
            writer.write_tensor_data(quantize(data, storage[t.gguf_name]))
            if bar is not None:
                bar.update(1)
    finally:
        writer.close()
        if bar is not None:
            bar.close()


def add_decoder_metadata(writer: GGUFWriter, gtype: GGUFType, config: DecoderConfig,
                         vocab: GGUFVocab, max_length: int,
                         pooling: PoolingType = PoolingType.LAST) -> None:
    """Hyperparameters, pooling (last token; rank for rerankers) and the BPE vocabulary shared
    by the qwen3 and qwen3vl GGUFs.

    The special-token ids and flags are left to the caller: they differ between the families.
    """
    writer.add_type("model")
    writer.add_file_type(int(gtype.file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_pooling_type(pooling)
    writer.add_uint32(MAX_LENGTH_KEY, max_length)
    if vocab.normalizer:
        writer.add_string(NORMALIZER_KEY, vocab.normalizer)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)


def _llama_quantize(source: Path, target: Path, gtype: GGUFType) -> None:
    """Run llama.cpp's own ``llama_model_quantize`` on an f32 GGUF."""
    import ctypes

    from qwen3emb.runtime._llama import last_llama_errors, llama_library

    lib = llama_library()
    params = lib.llama_model_quantize_default_params()
    params.ftype = int(gtype.file_type)
    params.nthread = os.cpu_count() or 1
    status = lib.llama_model_quantize(str(source).encode(), str(target).encode(),
                                      ctypes.byref(params))
    if status != 0:
        raise OutputError(
            f"llama.cpp could not quantize to {gtype.name} (status {status}): "
            f"{last_llama_errors() or 'no message'}",
            hint="Run with --verbose to see llama.cpp's log",
        )


def _atomic(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path``; remove ``tmp`` on any failure."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"writing '{path}' failed: {e}",
                          hint="Check free disk space and permissions") from e
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
