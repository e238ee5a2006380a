"""Find a checkpoint (local directory or hub id), read its config and check its weights."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3emb.errors import CheckpointError
from qwen3emb.manifest import sha256_file

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on local disk: where it is, what it was called, and its config."""

    path: Path
    source: str
    config: dict[str, Any]
    weight_files: tuple[Path, ...] = field(default=())

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def weights_sha256(self) -> list[dict[str, str]]:
        """sha256 of every safetensors file, for the manifest."""
        return [{"file": f.name, "sha256": sha256_file(f)} for f in self.weight_files]


def resolve_source(source: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """Return a local directory for ``source``: an existing path, or a hub id to download.

    Raises:
        CheckpointError: path missing and not a hub id, or the hub download failed.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"'{source}' is a file, not a checkpoint directory",
                hint="Pass the directory that holds config.json and the safetensors files",
            )
        return path
    text = str(source)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(
            f"checkpoint '{source}' does not exist",
            hint="Pass a local directory with config.json, or a hub id "
            "like Qwen/Qwen3-Embedding-0.6B",
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError("huggingface_hub is needed to download hub ids",
                              hint="pip install 'qwen3emb-export[export]'") from e
    logger.info("downloading %s from the Hugging Face hub", text)
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # the hub raises many types: network, auth, not found
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"could not download '{text}' from the Hugging Face hub ({type(e).__name__}: "
            f"{reason[:160]})",
            hint="Check the id, your network and HF_TOKEN, or pass a local directory",
        ) from e


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError
        raise CheckpointError(
            f"'{path}' is not a readable safetensors file ({e})",
            hint="The file is corrupt or truncated: download the checkpoint again",
        ) from e
    # The header can be intact while the data is cut short: compare sizes.
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise CheckpointError(
            f"'{path}' is truncated ({path.stat().st_size} bytes, header promises "
            f"{8 + header_len + end})",
            hint="Download the checkpoint again",
        )
    if not keys:
        raise CheckpointError(f"'{path}' holds no tensors", hint="Download the checkpoint again")


def load_checkpoint(source: str | os.PathLike[str], *, revision: str | None = None) -> Checkpoint:
    """Locate a checkpoint and read config.json; verify its safetensors files are intact.

    Args:
        source: a local directory or a Hugging Face hub id.
        revision: hub revision (ignored for local directories).

    Returns:
        The checkpoint with its parsed config and weight files.

    Raises:
        CheckpointError: missing directory or config, no or corrupt safetensors.
    """
    path = resolve_source(source, revision=revision)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"'{path}' has no config.json",
            hint="Pass the checkpoint's root directory (the one with config.json)",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse '{config_path}': {e}",
                              hint="Fix or re-download config.json") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"'{config_path}' is not a JSON object", hint="Re-download it")
    weights = tuple(sorted(path.glob("*.safetensors")))
    if not weights:
        raise CheckpointError(
            f"'{path}' has no *.safetensors weights",
            hint="Only safetensors checkpoints are supported; convert .bin files first",
        )
    for file in weights:
        _check_safetensors(file)
    return Checkpoint(path=path, source=str(source), config=config, weight_files=weights)
