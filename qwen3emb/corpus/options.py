"""What a corpus job embeds, where it runs, and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen3emb.errors import InputError

TEXT_UNIT_ROWS = 1024
IMAGE_UNIT_ROWS = 64
"""Rows per unit: a unit is one block in the pipeline and one part file; image rows carry their
bytes, so their units are smaller."""


@dataclass(frozen=True)
class CorpusOptions:
    """What to embed and how; every field changes the output, so all go into the unit keys.

    Args:
        text_column, id_column, image_column: see :class:`~qwen3emb.corpus.inputs.Columns`.
        query: text bundles: embed rows as queries (instruction ``Instruct: ...\\nQuery:``).
        instruction: the query task (text bundles, with ``query``) or the system instruction
            (Qwen3-VL bundles).
        dimensions: Matryoshka width.
        precision: the bundle's ONNX model to run.
        float16: store float16 vectors.
        batch_size: rows per onnxruntime call.
        unit_rows: rows per unit (default 1024, 64 with an image column).
        provider: where actors run the graph: an onnxruntime provider (``cpu``, ``cuda``) or
            ``openvino`` (default: onnxruntime on CPU).
    """

    text_column: str = "text"
    id_column: str | None = None
    image_column: str | None = None
    query: bool = False
    instruction: str | None = None
    dimensions: int | None = None
    precision: str = "fp32"
    float16: bool = False
    batch_size: int = 32
    unit_rows: int | None = None
    provider: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.unit_rows is not None and self.unit_rows < 1:
            raise InputError(f"--unit-rows must be at least 1, got {self.unit_rows}")
        if self.instruction is not None and not self.instruction.strip():
            raise InputError("--instruction is empty", hint="Omit it to use the default")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the job runs.

    Args:
        address: Ray cluster address (default ``RAY_ADDRESS``, else a local Ray).
        actors: embedding actors (default: as many as the CPUs allow).
        threads_per_actor: onnxruntime threads per actor (default: up to 4).
        num_cpus: CPUs of a local Ray (default: this machine's).
        object_store_memory: bytes of a local Ray's object store.
        verbose: Ray's own logs and its workers' output.
    """

    address: str | None = None
    actors: int | None = None
    threads_per_actor: int | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    verbose: bool = False


@dataclass
class CorpusSummary:
    """What a run did. Totals cover the whole OUT; ``*_now`` only this run."""

    out: str
    rows: int
    errors: int
    errors_by_code: dict[str, int]
    tokens: int
    units: int
    units_now: int
    rows_now: int
    tokens_now: int
    seconds: float
    where: str = "nowhere (nothing was left to do)"
    actors: int = 0
    threads_per_actor: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows_now / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_now / self.seconds if self.seconds > 0 else 0.0


