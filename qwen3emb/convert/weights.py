"""Read checkpoint tensors one at a time from safetensors shards, converting dtype on the fly.

This is what keeps memory flat for big models: the exporter traces with weightless (meta)
tensors and reads each weight from its shard only when it streams it into the ONNX data file;
the validator's layer-by-layer reference loads one decoder layer at a time the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qwen3emb.errors import CheckpointError

logger = logging.getLogger(__name__)


class ShardedWeights:
    """Index of every tensor in a checkpoint's safetensors shards.

    Args:
        files: the ``*.safetensors`` files of one checkpoint.

    Raises:
        CheckpointError: a tensor name appears in two shards.
    """

    def __init__(self, files: tuple[Path, ...] | list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in files:
            header = _read_header(file)
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
            for key in keys:
                if key in self._where:
                    raise CheckpointError(f"tensor '{key}' is in both {self._where[key].name} and "
                                          f"{file.name}", hint="Re-download the checkpoint")
                self._where[key] = file
                self._meta[key] = (header[key]["dtype"], tuple(header[key]["shape"]))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def dtype(self, key: str) -> str:
        """The stored safetensors dtype name (``BF16``, ``F32``, ...)."""
        return self._meta[key][0]

    def nbytes(self, key: str, itemsize: int = 4) -> int:
        """Size of the tensor once converted to an ``itemsize``-byte dtype."""
        return int(np.prod(self.shape(key), dtype=np.int64)) * itemsize

    def load(self, key: str, dtype: Any = np.float32) -> np.ndarray:
        """Read one tensor and convert it (bf16 → fp32 is exact).

        The shard is opened for this read only: safetensors memory-maps it, and the pages a
        read touched stay resident (and count in the process's RSS) as long as the mapping
        lives, so a handle kept open across a whole export would grow to the shard's size.
        """
        import torch
        from safetensors import safe_open

        torch_dtype = {np.float32: torch.float32, np.float16: torch.float16}.get(dtype)
        if torch_dtype is None:
            raise ValueError(f"unsupported target dtype {dtype}")
        with safe_open(str(self._where[key]), framework="pt") as handle:
            tensor = handle.get_tensor(key)
        return tensor.to(torch_dtype).numpy()

    def load_rows(self, key: str, rows: list[int]) -> np.ndarray:
        """Rows ``rows`` of a 2-D tensor in fp32, reading only those rows of the shard."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as handle:
            part = handle.get_slice(key)
            return np.stack([part[row:row + 1].to(torch.float32).numpy()[0] for row in rows])

    def close(self) -> None:
        """Nothing stays open between reads; kept for callers that close explicitly."""


def _read_header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header: dict[str, Any] = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def shard_index(checkpoint_dir: Path) -> dict[str, str] | None:
    """The ``weight_map`` of ``model.safetensors.index.json``, if the checkpoint has one."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if not index.is_file():
        return None
    return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
