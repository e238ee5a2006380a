"""OpenVINO compiling a bundle's ONNX graph directly: the ``openvino`` provider.

``providers="openvino"`` (or ``"openvino:GPU"``, ``"openvino:NPU"``) runs a bundle's graph on
OpenVINO instead of onnxruntime, with the ``openvino`` package alone (no onnxruntime build
with OpenVINO inside). On CPU, OpenVINO runs 8-bit weight MatMuls (the bundles' ``nbits8``
and ``nbits8-128`` tiers, int4's MatMulNBits) with int8 activations quantized per group of
:data:`DYNAMIC_GROUP` input channels on VNNI kernels: 1.7x faster per MatMul than
onnxruntime's own block-wise kernel (``scripts/bench_kernels.py``). That changes the numbers
of those tiers, so a bundle served on OpenVINO is validated on OpenVINO
(``validate -p openvino``): the report gives it its own rows.

The session offers what the runtime's loaders call: ``run(names, feeds)`` and
``get_providers()``. One infer request per calling thread, so a server's threads can share it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.errors import BundleError
from qwen3emb.runtime.common import optional_module

PROVIDER = "openvino"
DYNAMIC_GROUP = 32
"""Input channels per int8 activation scale in 8-bit weight MatMuls (q8_0's block), pinned
so a bundle's parity on OpenVINO does not move with the plugin's default."""


def is_openvino(name: str) -> bool:
    """``openvino`` or ``openvino:<device>``, any case (not onnxruntime's
    ``OpenVINOExecutionProvider``, which is an onnxruntime build's)."""
    return name.lower() == PROVIDER or name.lower().startswith(PROVIDER + ":")


def device_of(name: str) -> str:
    return name.split(":", 1)[1].upper() if ":" in name else "CPU"


def _ov() -> Any:
    return optional_module("openvino", "the openvino provider needs the openvino package",
                           "pip install 'qwen3emb-export[openvino]' (or openvino)")


def version() -> str:
    """The installed OpenVINO's version, short (``2026.4.1``)."""
    return str(_ov().__version__).split("-")[0]


class OpenVINOSession:
    """One ONNX graph compiled by OpenVINO for ``device``.

    Args:
        model: the ``.onnx`` file (its external data beside it).
        device: an OpenVINO device: ``CPU``, ``GPU``, ``NPU``.
        threads: CPU inference threads (default: OpenVINO's, all physical cores).

    Raises:
        MissingDependencyError: ``openvino`` is not installed.
        BundleError: OpenVINO cannot read or compile the graph, or has no such device.
    """

    def __init__(self, model: Path, device: str = "CPU", threads: int | None = None) -> None:
        ov = _ov()
        core = ov.Core()
        if device not in core.available_devices:
            raise BundleError(f"OpenVINO has no device '{device}' here "
                              f"(it has {', '.join(core.available_devices) or 'none'})",
                              hint="Use -p openvino (CPU), or install that device's driver")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":
            # f32, not the bf16 OpenVINO picks on CPUs with AMX/avx512_bf16: the fp32 graph
            # stays fp32, and only the bundle's own integer tiers are quantized.
            config.update({"INFERENCE_PRECISION_HINT": "f32",
                           "DYNAMIC_QUANTIZATION_GROUP_SIZE": DYNAMIC_GROUP})
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self._compiled = core.compile_model(os.fspath(model), device, config)
        except Exception as e:  # OpenVINO raises RuntimeError with multi-line text
            raise BundleError(
                f"OpenVINO cannot compile '{model}': {str(e).strip().splitlines()[0][:200]}",
                hint="Run it on onnxruntime (drop -p openvino), or upgrade openvino") from e
        self.device = device
        self._outputs = {name: port for port in self._compiled.outputs
                         for name in port.get_names()}
        self._order = list(self._compiled.outputs)
        self._local = threading.local()

    def get_providers(self) -> list[str]:
        return [f"{PROVIDER}:{self.device}"]

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]
            ) -> list[np.ndarray]:
        """Outputs ``names`` (all, in the graph's order, for ``None``) for ``feeds``."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        request.infer(dict(feeds))
        ports = self._order if names is None else [self._outputs[n] for n in names]
        # The request's tensors are reused by its next call: copy them out.
        return [np.array(request.get_tensor(port).data, copy=True) for port in ports]
