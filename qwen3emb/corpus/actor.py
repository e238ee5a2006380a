"""The embedding stage: a Ray Data callable class that loads the bundle once per actor.

``__call__`` maps one batch (a pyarrow table of rows from :mod:`qwen3emb.corpus.read`) to one
batch of results. Rows are embedded unit by unit, each unit's rows batched by length exactly as
``TextEmbedder.encode`` batches them, so a row's batch mates, and with them the last bits of its
vector, depend only on its unit: a rerun, a retried task or a resumed job gives identical vectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen3emb.corpus.read import BAD_IMAGE, BAD_INPUT
from qwen3emb.errors import BundleError, Qwen3EmbError
from qwen3emb.manifest import sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedSettings:
    """What every actor needs to load the bundle and embed like the others.

    Args:
        bundle: the bundle directory (on shared storage when on a cluster).
        bundle_sha256: sha256 of its ``manifest.json``; an actor that finds another bundle
            there refuses to start.
        precision: the ONNX model of the bundle to run.
        threads: onnxruntime intra-op threads per actor.
        batch_size: rows per onnxruntime call.
        dimensions: Matryoshka width, or ``None`` for the full width.
        query: text bundles: format rows as queries with ``instruction`` as the task.
        instruction: the query task (text) or system instruction (Qwen3-VL).
        float16: return float16 vectors.
        provider: onnxruntime provider or ``openvino`` (default: onnxruntime CPU).
    """

    bundle: str
    bundle_sha256: str
    precision: str = "fp32"
    threads: int = 1
    batch_size: int = 32
    dimensions: int | None = None
    query: bool = False
    instruction: str | None = None
    float16: bool = False
    provider: str | None = None


def result_schema(dim: int, float16: bool) -> Any:
    """The Arrow schema of the embedding stage's output."""
    import pyarrow as pa

    value = pa.float16() if float16 else pa.float32()
    return pa.schema([("_unit", pa.string()), ("_row", pa.int64()), ("_n", pa.int64()),
                      ("id", pa.string()), ("embedding", pa.list_(value, dim)),
                      ("n_tokens", pa.int32()), ("truncated", pa.bool_()),
                      ("_code", pa.string()), ("_reason", pa.string())])


class EmbedActor:
    """Ray Data callable class: ``__init__`` loads the bundle, ``__call__`` embeds a batch.

    Raises:
        BundleError: the bundle on this node is not the one the driver checked.
    """

    def __init__(self, settings: EmbedSettings) -> None:
        from pathlib import Path

        from qwen3emb.manifest import read_manifest

        found = sha256_file(Path(settings.bundle) / "manifest.json")
        if found != settings.bundle_sha256:
            raise BundleError(f"the bundle at '{settings.bundle}' on this node is not the one "
                              "the job was started with", hint="Put one bundle on shared storage")
        self.settings = settings
        manifest = read_manifest(settings.bundle)
        self.vision = "vision" in manifest.data
        providers = [settings.provider] if settings.provider else None
        # The driver verified every file's hash once; actors only compare the manifest.
        if self.vision:
            from qwen3emb.runtime import VLEmbedder

            self.embedder: Any = VLEmbedder(settings.bundle, providers,
                                            precision=settings.precision,
                                            threads=settings.threads, verify=False)
        else:
            from qwen3emb.runtime import TextEmbedder

            self.embedder = TextEmbedder(settings.bundle, providers, precision=settings.precision,
                                         threads=settings.threads, verify=False)
        self.dim = settings.dimensions or self.embedder.dim
        self.schema = result_schema(self.dim, settings.float16)

    def __call__(self, batch: Any) -> Any:
        """Embed a pyarrow batch of read rows → a pyarrow batch of results (same rows)."""
        import pyarrow as pa

        units = batch["_unit"].to_pylist()
        rows = batch["_row"].to_pylist()
        codes = batch["_code"].to_pylist()
        reasons = batch["_reason"].to_pylist()
        texts = batch["text"].to_pylist()
        images = batch["image"].to_pylist()
        vectors = np.zeros((len(units), self.dim), dtype=np.float32)
        tokens = [0] * len(units)
        truncated = [False] * len(units)
        groups: dict[str, list[int]] = {}
        for i, (unit, row, code) in enumerate(zip(units, rows, codes)):
            if code is None and row >= 0:
                groups.setdefault(unit, []).append(i)
        for members in groups.values():
            self._embed_group(members, rows, texts, images, vectors, tokens, truncated,
                              codes, reasons)
        good = np.array([c is None and r >= 0 for c, r in zip(codes, rows)], dtype=bool)
        flat = vectors.astype(np.float16 if self.settings.float16 else np.float32).reshape(-1)
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(flat), self.dim, mask=pa.array(~good))
        return pa.Table.from_arrays(
            [batch["_unit"], batch["_row"], batch["_n"], batch["id"], embedding,
             pa.array(tokens, pa.int32()), pa.array(truncated, pa.bool_()),
             pa.array(codes, pa.string()), pa.array(reasons, pa.string())],
            schema=self.schema)

    def _embed_group(self, members: list[int], rows: list[int], texts: list[Any],
                     images: list[Any],
                     vectors: np.ndarray, tokens: list[int], truncated: list[bool],
                     codes: list[str | None], reasons: list[str | None]) -> None:
        """Embed one unit's good rows in place; rows the model refuses become error rows."""
        s = self.settings
        if not self.vision:
            items = [texts[i] for i in members]
            if s.query:
                from qwen3emb.runtime.common import format_query

                template = self.embedder.manifest.prompt.get("query_template")
                items = [format_query(t, s.instruction, template) if template
                         else format_query(t, s.instruction) for t in items]
            ids, cut = self.embedder.tokenize_with_truncation(items)
            vectors[members] = self.embedder.encode_tokens(ids, dimensions=s.dimensions,
                                                           batch_size=s.batch_size)
            for j, i in enumerate(members):
                tokens[i], truncated[i] = len(ids[j]), cut[j]
            return
        from qwen3emb.runtime.vl_prompt import format_instruction

        system = format_instruction(s.instruction)
        prepared, kept = [], []
        for i in members:
            item = {k: v for k, v in (("text", texts[i]), ("image", images[i])) if v is not None}
            try:
                prepared.append(self.embedder.prepare(item, rows[i], system))
                kept.append(i)
            except Qwen3EmbError as e:
                codes[i], reasons[i] = BAD_IMAGE if "image" in item else BAD_INPUT, e.one_line()
        if not prepared:
            return
        out = self.embedder.embed_prepared(prepared, batch_size=s.batch_size)
        if s.dimensions is not None and s.dimensions != out.shape[1]:
            from qwen3emb.runtime.common import truncate_normalize

            out = truncate_normalize(out, s.dimensions)
        vectors[kept] = out
        for item, i in zip(prepared, kept):
            tokens[i], truncated[i] = len(item.ids), item.truncated
