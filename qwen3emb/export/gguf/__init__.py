"""GGUF files for llama.cpp through gguf-py: text (``qwen3``) and Qwen3-VL (``qwen3vl`` +
``mmproj``) models, their vocabulary, and llama.cpp's own k-quants.

Writers are registered per ``model_type``, as llama.cpp's own converter registers its model
classes by HF architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qwen3emb.errors import UnsupportedModelError

GGUFWriter = Callable[..., list[dict[str, Any]]]
"""``writer(checkpoint_dir, out_dir, types, *, max_length, progress) -> entries``; each entry
has ``path`` relative to ``out_dir`` (and ``mmproj``, likewise, for multimodal models)."""


def _writers() -> dict[str, GGUFWriter]:
    from qwen3emb.export.gguf.text import export_gguf
    from qwen3emb.export.gguf.vl import export_vl_gguf

    return {"qwen3": export_gguf, "qwen3_vl": export_vl_gguf}


def gguf_writer(family: Any) -> GGUFWriter:
    """The GGUF writer of ``family``.

    Raises:
        UnsupportedModelError: no GGUF writer for its model type; lists the supported ones.
    """
    writers = _writers()
    if family.model_type not in writers:
        raise UnsupportedModelError(
            f"no GGUF export for model type '{family.model_type}'",
            hint=f"GGUF is written for: {', '.join(sorted(writers))}; use --format onnx")
    return writers[family.model_type]
