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


def checked_on(runner: Any, kind: str, precision: str) -> str:
    """What ran an artifact, as the report shows it: ``onnxruntime CPUExecutionProvider,
    int8 kernel u8s8`` (the kernel only matters to integer graphs), or ``llama.cpp``."""
    if kind != "onnx":
        return "llama.cpp"
    from qwen3emb.runtime.kernels import int8_kernel

    providers = getattr(runner, "providers", None) or ["?"]
    first = providers[0]
    integer = precision in ("int8", "int4") and first == "CPUExecutionProvider"
    kernel = f", int8 kernel {int8_kernel()}" if integer else ""
    return f"onnxruntime {first}{kernel}"
