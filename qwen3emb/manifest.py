"""The bundle manifest: what is inside a bundle, how it was made, and how to check it.

Torch-free: the runtime reads it on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3emb.constants import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST_FILE
from qwen3emb.errors import BundleError

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path, **extra: Any) -> dict[str, Any]:
    """Describe one file of a bundle: relative path, size and sha256, plus ``extra`` keys."""
    entry: dict[str, Any] = {
        "path": path.relative_to(root).as_posix(),
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    entry.update(extra)
    return entry


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to ``path`` and rename it into place, so readers never see half a file."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``; ``data`` keeps every key, the properties name the common ones."""

    root: Path
    data: dict[str, Any]

    @property
    def family(self) -> str:
        return str(self.data["family"])

    @property
    def task(self) -> str:
        """``embed`` or ``rerank`` (bundles written before rerankers existed embed)."""
        return str(self.data.get("task", "embed"))

    @property
    def rerank(self) -> dict[str, Any]:
        """A reranker's prompt and head facts (``task: rerank``)."""
        return dict(self.data["rerank"])

    @property
    def embedding(self) -> dict[str, Any]:
        return dict(self.data["embedding"])

    @property
    def dim(self) -> int:
        return int(self.data["embedding"]["dim"])

    @property
    def mrl_min(self) -> int:
        return int(self.data["embedding"]["mrl_min"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        return dict(self.data["tokenizer"])

    @property
    def max_length(self) -> int:
        return int(self.data["tokenizer"]["max_length"])

    @property
    def prompt(self) -> dict[str, Any]:
        return dict(self.data["prompt"])

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return list(self.data["artifacts"])

    @property
    def parity(self) -> dict[str, Any]:
        return dict(self.data.get("parity") or {"status": "not-run"})

    def models(self, kind: str = "onnx") -> dict[str, dict[str, Any]]:
        """Model artifacts of one kind keyed by precision, e.g. ``{"fp32": {...}}``."""
        return {
            a["precision"]: a
            for a in self.artifacts
            if a.get("kind") == kind and a.get("role") == "model"
        }

    def runs_on_llama_cpp(self, precision: str | None, providers: Any = None, *,
                          default: str | None = None) -> bool:
        """Whether ``precision`` is served by llama.cpp: it names only a GGUF of the bundle,
        or none is named (``None``, or the caller's ``default``) and the bundle has GGUF files
        only.

        Raises:
            InputError: onnxruntime ``providers`` with a GGUF precision.
        """
        onnx, gguf = self.models("onnx"), self.models("gguf")
        chosen = (precision in gguf and precision not in onnx) or (
            precision in (None, default) and not onnx and bool(gguf))
        if chosen and providers:
            from qwen3emb.errors import InputError

            raise InputError("--provider applies to ONNX models, not GGUF",
                             hint="Drop --provider, or choose an ONNX --precision")
        return chosen

    def verify(self) -> list[str]:
        """Check every listed file exists with the recorded size and sha256.

        Returns:
            A list of problems, one line each; empty when the bundle is intact.
        """
        problems: list[str] = []
        for entry in self.artifacts:
            path = self.root / entry["path"]
            if not path.is_file():
                problems.append(f"{entry['path']}: missing")
                continue
            size = path.stat().st_size
            if size != entry["size"]:
                problems.append(f"{entry['path']}: size {size} != recorded {entry['size']}")
                continue
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                problems.append(f"{entry['path']}: sha256 {digest[:12]}… != recorded")
        return problems


def read_manifest(bundle: str | os.PathLike[str]) -> Manifest:
    """Load and sanity-check ``BUNDLE/manifest.json``.

    Args:
        bundle: the bundle directory.

    Returns:
        The parsed manifest.

    Raises:
        BundleError: the directory or manifest is missing, unreadable or of another format.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(
            f"bundle directory '{root}' does not exist",
            hint="Pass the directory written by 'qwen3emb-export export ... -o DIR'",
        )
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"'{root}' has no {MANIFEST_FILE}, so it is not a complete bundle",
            hint="Re-run the export; an interrupted export never leaves a manifest",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read '{path}': {e}", hint="Re-run the export") from e
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"'{path}' is not a {BUNDLE_FORMAT} manifest", hint="Re-run the export")
    version = data.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"'{path}' has format_version {version}; this tool reads {BUNDLE_FORMAT_VERSION}",
            hint="Re-export the bundle with this version of qwen3emb-export",
        )
    required = ("family", "tokenizer", "artifacts",
                *(("rerank",) if data.get("task") == "rerank" else ("embedding", "prompt")))
    missing = [k for k in required if k not in data]
    if missing:
        raise BundleError(f"'{path}' lacks keys {missing}", hint="Re-run the export")
    return Manifest(root=root, data=data)
