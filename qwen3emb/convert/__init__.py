"""Checkpoint → export-ready module. One module per family, keyed by config.json's model_type.

Families register themselves with :func:`register`; :func:`family_for` picks one for a
checkpoint or raises an error listing the supported model types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from qwen3emb.convert.base import Family
from qwen3emb.convert.checkpoint import Checkpoint, load_checkpoint
from qwen3emb.errors import UnsupportedModelError

FAMILIES: dict[str, type[Family]] = {}
RERANKERS: dict[str, type[Family]] = {}
"""Families exported with ``task: rerank``, by model type."""

# Known model types that a later release will export; they get their own message.
PLANNED: dict[str, str] = {}

F = TypeVar("F", bound=type[Family])


def register(*model_types: str, task: str = "embed") -> Callable[[F], F]:
    """Class decorator: export checkpoints whose config.json has one of ``model_types`` (as
    embedders, or with ``task="rerank"`` as rerankers)."""

    def wrap(cls: F) -> F:
        for key in model_types:
            (RERANKERS if task == "rerank" else FAMILIES)[key] = cls
        return cls

    return wrap


def family_for(checkpoint: Checkpoint, task: str = "embed") -> Family:
    """Return the family that exports ``checkpoint`` for ``task`` (``embed`` or ``rerank``).

    Raises:
        UnsupportedModelError: model_type missing or not supported; lists the supported ones.
    """
    model_type = checkpoint.model_type
    supported = ", ".join(sorted(FAMILIES))
    if model_type in PLANNED:
        raise UnsupportedModelError(PLANNED[model_type],
                                    hint=f"Supported model types today: {supported}")
    if model_type not in FAMILIES:
        found = f"'{model_type}'" if model_type else "no model_type"
        raise UnsupportedModelError(
            f"config.json in '{checkpoint.path}' has {found}, which this tool does not export",
            hint=f"Supported model types: {supported}",
        )
    if task == "rerank":
        if model_type not in RERANKERS:
            raise UnsupportedModelError(
                f"'{model_type}' checkpoints cannot be exported as rerankers yet",
                hint=f"Reranker model types: {', '.join(sorted(RERANKERS))}; "
                     "or export it as an embedder with --task embed")
        return RERANKERS[model_type](checkpoint)
    return FAMILIES[model_type](checkpoint)


# Importing the family modules registers them.
from qwen3emb.convert import qwen3, qwen3_reranker, qwen3_vl, qwen3_vl_reranker  # noqa: E402,F401,I001

__all__ = ["FAMILIES", "RERANKERS", "Checkpoint", "Family", "family_for", "load_checkpoint",
           "register"]
