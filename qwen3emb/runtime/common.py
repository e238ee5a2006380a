"""Pieces every embedder shares, whatever runs the model (onnxruntime or llama.cpp)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen3emb.constants import DEFAULT_TASK, QUERY_TEMPLATE
from qwen3emb.errors import BundleError, InputError, MissingDependencyError


def optional_module(name: str, needed_for: str, hint: str) -> Any:
    """Import ``name`` (``PIL.Image``, ``av``, ``openvino``), or say in one line what needs it.

    Raises:
        MissingDependencyError: the module is not installed.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(needed_for, hint=hint) from e


def format_query(query: str, task: str | None = None, template: str = QUERY_TEMPLATE) -> str:
    """Apply the official query instruction: ``Instruct: {task}\\nQuery:{query}``."""
    return template.format(task=DEFAULT_TASK if task is None else task, query=query)


def check_texts(texts: Sequence[str] | str) -> list[str]:
    """Validate a list of input texts.

    Raises:
        InputError: a bare string instead of a list, an empty list, a non-string or an empty
            string, naming the offending index.
    """
    if isinstance(texts, str):
        raise InputError("expected a list of texts, got a single string",
                         hint="Wrap it in a list: encode([text])")
    items = list(texts)
    if not items:
        raise InputError("no texts to embed: the input list is empty",
                         hint="Pass at least one non-empty string")
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise InputError(f"text {i} is a {type(text).__name__}, not a string",
                             hint="Pass strings only")
        if text == "":
            raise InputError(f"text {i} is an empty string, which has no content to embed",
                             hint="Drop empty strings or replace them with real text")
    return items


def check_items(items: Any, accepted: str) -> list[Any]:
    """Validate a list of multimodal items (dicts); ``accepted`` names the keys for the hint.

    Raises:
        InputError: a single item instead of a list, or an empty list.
    """
    from collections.abc import Mapping

    if isinstance(items, (Mapping, str)):
        raise InputError("expected a list of items, got a single item",
                         hint="Wrap it in a list: encode([item])")
    out = list(items)
    if not out:
        raise InputError("no items to embed: the input list is empty",
                         hint=f"Pass at least one dict with {accepted}")
    return out


def check_dimensions(dimensions: int | None, *, dim: int, mrl_min: int) -> int:
    """Return the output width, checking ``dimensions`` against the bundle's MRL range.

    Raises:
        InputError: outside ``mrl_min..dim``.
    """
    if dimensions is None:
        return dim
    if isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer)):
        raise InputError(f"dimensions must be an integer, got {dimensions!r}")
    if not mrl_min <= int(dimensions) <= dim:
        raise InputError(
            f"dimensions={dimensions} is outside this bundle's Matryoshka range {mrl_min}..{dim}",
            hint=f"Choose a value from {mrl_min} to {dim}",
        )
    return int(dimensions)


def truncate_normalize(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Matryoshka truncation: keep the first ``dimensions`` columns, then L2-normalize again."""
    out = np.ascontiguousarray(vectors[:, :dimensions], dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, np.float32(1e-12))


BATCH_TOKENS = 8192
"""Padded tokens per onnxruntime call (rows × longest row): an 8K text runs alone, and a
batch never pads seven short texts to a long one."""


def length_batches(lengths: Sequence[int], batch_size: int,
                   max_tokens: int | None = BATCH_TOKENS) -> list[list[int]]:
    """Group indices into batches of similar length (longest first) to limit padding.

    A batch ends at ``batch_size`` rows or when one more row would pad it past
    ``max_tokens`` (``None``: no token bound); a row longer than that runs alone. The
    grouping depends only on ``lengths``.

    Raises:
        InputError: batch_size < 1.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if (batches and len(batches[-1]) < batch_size
                and (max_tokens is None
                     or (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens)):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def describe(obj: Any) -> str:
    """Short repr for error messages (first 40 characters)."""
    text = repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."


def check_loadable(manifest: Any, bundle: Any, *, verify: bool, strict: bool) -> None:
    """The checks every loader makes: the hash check (``verify``) and, with ``strict``, the
    recorded parity status.

    Raises:
        BundleError: a file fails its hash check, or the recorded parity check failed.
    """
    if verify and (problems := manifest.verify()):
        raise BundleError(f"bundle '{bundle}' fails its hash check: {'; '.join(problems)}",
                          hint="Re-run the export; do not edit bundle files by hand")
    if strict and manifest.parity.get("status") == "failed":
        raise BundleError(
            f"bundle '{bundle}' failed its parity check against the reference",
            hint="See reports/parity.md in the bundle; pass strict=False to load it anyway",
        )


def checked_model(manifest: Any, bundle: Any, precision: str, *, verify: bool,
                  strict: bool) -> dict[str, Any]:
    """The bundle's ONNX model entry of ``precision``, after :func:`check_loadable`.

    Raises:
        BundleError: from :func:`check_loadable`.
        InputError: the bundle has no ONNX model of ``precision``.
    """
    check_loadable(manifest, bundle, verify=verify, strict=strict)
    models = manifest.models("onnx")
    if precision not in models:
        raise InputError(f"bundle has no '{precision}' ONNX model",
                         hint=f"Available precisions: {', '.join(sorted(models))}")
    return dict(models[precision])
