"""The runtime embedder behind one artifact of a text bundle, as the validator runs it."""

from __future__ import annotations

from typing import Any


def open_runner(bundle: Any, kind: str, precision: str, limit: int, providers: Any,
                manifest: Any) -> tuple[Any, int]:
    """The runtime embedder of one artifact (ONNX or GGUF) and its output width.

    Raises:
        Qwen3EmbError: the artifact does not load.
    """
    if kind == "onnx":
        from qwen3emb.runtime.text import TextEmbedder

        runner = TextEmbedder(bundle, providers, precision=precision, verify=False,
                              max_length=limit, strict=False)
        return runner, int(manifest.embedding["output_dim"])
    from qwen3emb.runtime.gguf import GGUFTextEmbedder

    gguf = GGUFTextEmbedder(bundle, gguf_type=precision, max_length=limit)
    return gguf, gguf.dim
