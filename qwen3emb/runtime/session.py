"""onnxruntime sessions: provider names, availability checks, session options."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen3emb.errors import BundleError, MissingDependencyError, ProviderError

logger = logging.getLogger(__name__)

PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
}
"""onnxruntime's providers by short name. ``openvino`` is not onnxruntime's: it is OpenVINO
compiling the graph itself (:mod:`qwen3emb.runtime.openvino`)."""


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            "onnxruntime is not installed",
            hint="pip install onnxruntime (CPU/CoreML) or onnxruntime-gpu (CUDA)",
        ) from e
    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime offers, by their full names."""
    return list(_ort().get_available_providers())


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Map short names (``cpu``, ``cuda``, ``coreml``) to provider names and check them.

    CPU is appended as the fallback for nodes another provider does not take.

    ``openvino`` / ``openvino:<device>`` stands alone: OpenVINO runs the whole graph.

    Raises:
        ProviderError: a requested provider is unknown or not in this onnxruntime build, or
            ``openvino`` is combined with onnxruntime providers.
    """
    from qwen3emb.runtime.openvino import device_of, is_openvino

    if providers is None:
        return ["CPUExecutionProvider"]
    names = [providers] if isinstance(providers, str) else list(providers)
    if any(is_openvino(n) for n in names):
        if len(names) > 1:
            raise ProviderError(
                f"provider '{next(n for n in names if is_openvino(n))}' runs the whole graph "
                "on OpenVINO and cannot be combined with other providers",
                hint="Pass -p openvino alone (or openvino:GPU)")
        return [f"openvino:{device_of(names[0])}"]
    available = available_providers()
    resolved: list[str] = []
    for name in names:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            short = [k for k, v in PROVIDER_ALIASES.items() if v in available] + ["openvino"]
            hint = "Install onnxruntime-gpu for CUDA" if full.startswith("CUDA") else None
            raise ProviderError(
                f"execution provider '{name}' is not available in this onnxruntime. "
                f"Available: {', '.join(short or available)}",
                hint=hint,
            )
        if full not in resolved:
            resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def open_session(model: Path, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, *, spinning: bool = True,
                 kernel_cache: Path | None = None, precision: str | None = None) -> Any:
    """Create an ``InferenceSession`` for ``model`` with full graph optimizations, or an
    :class:`~qwen3emb.runtime.openvino.OpenVINOSession` for the ``openvino`` provider.

    ``spinning=False`` stops onnxruntime's worker threads from spin-waiting between runs:
    slower for back-to-back calls in one loop, but a server's event loop and tokenizers get
    the cores instead (+15-20% requests/s at concurrency 64 on a loaded 2-core machine).
    ``kernel_cache``: where the int8 kernel copy goes (:func:`qwen3emb.runtime.kernels.for_cpu`).
    ``precision``: the bundle precision of ``model``; an int8/int4 graph on OpenVINO logs that
    the bundle's recorded parity was measured on onnxruntime.

    Raises:
        ProviderError: see :func:`resolve_providers`.
        BundleError: onnxruntime rejects the model file.
    """
    resolved = resolve_providers(providers)
    from qwen3emb.runtime.openvino import OpenVINOSession, device_of, is_openvino

    if is_openvino(resolved[0]):
        session: Any = OpenVINOSession(model, device_of(resolved[0]), threads)
        logger.info("loaded %s on %s", model.name, session.get_providers())
        if precision in ("int8", "int4"):
            # The export's parity check ran on onnxruntime; OpenVINO quantizes the activations
            # of 8-bit-weight MatMuls itself (the massive-activation fixture's searched int8:
            # min cosine 0.9935 on onnxruntime, 0.9764 on OpenVINO).
            logger.warning("%s runs on OpenVINO with other numbers than the parity report's "
                           "(measured on onnxruntime); check it there: qwen3emb-export validate "
                           "BUNDLE -r REFERENCE -p openvino", model.name)
        return session
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    loaded = model
    if resolved[0] == "CPUExecutionProvider":
        from qwen3emb.runtime.kernels import for_cpu

        loaded = for_cpu(model, kernel_cache)  # int8 codes on this CPU's fastest exact kernel
    try:
        session = ort.InferenceSession(os.fspath(loaded), sess_options=options,
                                       providers=resolved)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise BundleError(
            f"onnxruntime cannot load '{model}': {str(e).strip().splitlines()[0][:200]}",
            hint="The file may be corrupt or need a newer onnxruntime; re-export or upgrade",
        ) from e
    logger.info("loaded %s on %s", model.name, session.get_providers())
    return session
