"""The runtime embedder behind one artifact of a text bundle, as the validator runs it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def engines(providers: Sequence[str] | str | None) -> list[list[str] | None]:
    """The engines each ONNX artifact is checked on, one report row each: the onnxruntime
    chain (the named providers other than OpenVINO; CPU when none is named) and OpenVINO
    where named (``-p openvino`` alone checks OpenVINO only; ``-p cpu -p openvino`` both)."""
    from qwen3emb.runtime.openvino import is_openvino

    if not providers:
        return [None]
    names = [providers] if isinstance(providers, str) else list(providers)
    onnxruntime = [n for n in names if not is_openvino(n)]
    return ([onnxruntime] if onnxruntime else []) + [[n] for n in names if is_openvino(n)]


def engine_label(engine: list[str] | None) -> str | None:
    """How a row names a non-default engine (``openvino:CPU``); ``None`` for onnxruntime."""
    from qwen3emb.runtime.openvino import device_of, is_openvino

    if engine and is_openvino(engine[0]):
        return f"openvino:{device_of(engine[0])}"
    return None


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
    int8 kernel u8s8`` (the kernel only matters to integer graphs), ``OpenVINO 2026.4.1 CPU``,
    or ``llama.cpp``."""
    if kind != "onnx":
        return "llama.cpp"
    from qwen3emb.runtime.kernels import int8_kernel

    providers = getattr(runner, "providers", None) or ["?"]
    first = providers[0]
    if first.startswith("openvino:"):
        from qwen3emb.runtime.openvino import DYNAMIC_GROUP, version

        where = f"OpenVINO {version()} {first.split(':', 1)[1]}"
        integer = precision in ("int8", "int4")
        return f"{where}, int8 activations per {DYNAMIC_GROUP} channels" if integer else where
    integer = precision in ("int8", "int4") and first == "CPUExecutionProvider"
    kernel = f", int8 kernel {int8_kernel()}" if integer else ""
    return f"onnxruntime {first}{kernel}"
