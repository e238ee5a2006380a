"""The graph contract every writer and reader shares: names, axes, dtypes, opset, floors.

Families (:mod:`qwen3emb.convert`) declare their graphs with it; the writers
(:mod:`qwen3emb.export`) and the validator read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen3emb.constants import (
    ATTENTION_MASK,
    DEFAULT_OPSET,
    FLOORS,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    SCORE,
    SCORE_FLOORS,
    SENTENCE_EMBEDDING,
)
from qwen3emb.errors import InputError

MIN_OPSET = 18  # the dynamo exporter's lowest well-supported opset


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str
    axes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.axes)}


@dataclass(frozen=True)
class TextGraphSpec:
    """The ONNX contract of a text embedding graph.

    ``input_ids`` and ``attention_mask`` (int64, [batch, sequence]) in, ``sentence_embedding``
    (float32, [batch, dim], unit L2 norm) out first, then (with ``hidden_state_output``)
    ``last_hidden_state`` [batch, sequence, dim]: the same embedding broadcast over the
    sequence, for loaders that read only that name (see :data:`LAST_HIDDEN_STATE`). No KV
    cache, no position_ids input.
    """

    dim: int
    opset: int = DEFAULT_OPSET
    hidden_state_output: bool = True
    inputs: tuple[TensorSpec, ...] = field(default=(
        TensorSpec(INPUT_IDS, "int64", ("batch", "sequence")),
        TensorSpec(ATTENTION_MASK, "int64", ("batch", "sequence")),
    ))

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise InputError(f"embedding dim must be positive, got {self.dim}")
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise InputError(f"opset {self.opset} is too old for this exporter",
                             hint=f"Use --opset {MIN_OPSET} or newer")

    @property
    def name(self) -> str:
        """The graph's name: its file is ``onnx/<name>.onnx``."""
        return "model"

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        embedding = TensorSpec(SENTENCE_EMBEDDING, "float32", ("batch", str(self.dim)))
        if not self.hidden_state_output:
            return (embedding,)
        return (embedding,
                TensorSpec(LAST_HIDDEN_STATE, "float32", ("batch", "sequence", str(self.dim))))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def floor(self, precision: str) -> float:
        """Minimum cosine to the reference for an artifact of ``precision``."""
        return FLOORS[precision]

    def to_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


@dataclass(frozen=True)
class RerankGraphSpec:
    """The ONNX contract of a text reranker graph.

    The embedder's inputs (``input_ids``, ``attention_mask``: int64 [batch, sequence], any
    padding side) in; ``score`` (float32 [batch]: sigmoid of ``logits``) and ``logits``
    (float32 [batch, 1]: logit("yes") - logit("no") at the last real token) out. No
    vocabulary-wide head.
    """

    opset: int = DEFAULT_OPSET
    inputs: tuple[TensorSpec, ...] = field(default=(
        TensorSpec(INPUT_IDS, "int64", ("batch", "sequence")),
        TensorSpec(ATTENTION_MASK, "int64", ("batch", "sequence")),
    ))
    outputs: tuple[TensorSpec, ...] = field(default=(
        TensorSpec(SCORE, "float32", ("batch",)),
        TensorSpec(LOGITS, "float32", ("batch", "1")),
    ))
    metric: str = "score"
    """What the search and the validator measure: |score - reference score|."""

    def __post_init__(self) -> None:
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise InputError(f"opset {self.opset} is too old for this exporter",
                             hint=f"Use --opset {MIN_OPSET} or newer")

    @property
    def name(self) -> str:
        return "model"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def floor(self, precision: str) -> float:
        """Largest |score - reference score| allowed for an artifact of ``precision``."""
        return SCORE_FLOORS[precision]

    def to_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


@dataclass(frozen=True)
class GraphSpec:
    """The ONNX contract of one graph of a multi-graph bundle (e.g. ``vision``, ``decoder``).

    ``axes`` of each tensor name its dynamic dimensions; fixed ones are numbers as strings.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = DEFAULT_OPSET
    metric: str = "cosine"
    """What the search and the validator measure: ``cosine`` (embedding outputs, visual
    features) or ``score`` (a reranker decoder's |score - reference score|)."""

    def __post_init__(self) -> None:
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise InputError(f"opset {self.opset} is too old for this exporter",
                             hint=f"Use --opset {MIN_OPSET} or newer")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
