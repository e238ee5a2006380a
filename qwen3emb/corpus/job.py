"""The driver of a corpus job: plan units, run one Ray Data pipeline, commit units as they come.

One pipeline covers every pending unit: ``from_items(units)`` → ``map_batches(read_units)``
(zero-CPU tasks, one unit per block) → ``map_batches(EmbedActor)`` (an actor pool holding the
CPUs, one unit per call). The driver streams the results, gathers each unit's rows (dropping any
row a retried task delivers twice), and commits a unit once all its rows are in. Ray gives
at-least-once delivery after failures; the unit keys and commits make the output exactly once.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qwen3emb.corpus.actor import EmbedActor, EmbedSettings
from qwen3emb.corpus.bundle import check_bundle
from qwen3emb.corpus.cluster import describe_versions, plan_resources, ray_session
from qwen3emb.corpus.commit import FORMAT, OutputDir
from qwen3emb.corpus.inputs import Columns, check_inputs, discover_inputs, one_line
from qwen3emb.corpus.options import (
    IMAGE_UNIT_ROWS,
    TEXT_UNIT_ROWS,
    CorpusOptions,
    CorpusSummary,
    RayOptions,
)
from qwen3emb.corpus.plan import Unit, job_salt, plan_digest, plan_units
from qwen3emb.corpus.read import read_units
from qwen3emb.errors import OutputError, Qwen3EmbError
from qwen3emb.manifest import Manifest, read_manifest, sha256_file
from qwen3emb.progress import bar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobPlan:
    """Everything decided before any work starts."""

    manifest: Manifest
    settings: EmbedSettings
    columns: Columns
    units: list[Unit]
    job: dict[str, Any]
    """What identifies the job in ``_manifest.json`` (compared on ``--resume``)."""


def check_provider(provider: str) -> None:
    """Refuse, before any actor starts, a provider this machine's runtime cannot load.

    Raises:
        ProviderError / MissingDependencyError: unknown, unavailable or not installed.
    """
    from qwen3emb.runtime.openvino import is_openvino, version
    from qwen3emb.runtime.session import resolve_providers

    resolve_providers([provider])
    if is_openvino(provider):
        version()  # raises MissingDependencyError without the openvino package


def plan_job(bundle: str | Path, inputs: Sequence[str], options: CorpusOptions) -> JobPlan:
    """Check the bundle and the inputs, and cut the inputs into units.

    Raises:
        InputError: bad options, an input that cannot be read.
        BundleError: the bundle is missing or a file it needs does not match its sha256.
    """
    manifest = read_manifest(bundle)
    vision = check_bundle(manifest, options)
    bundle_sha = sha256_file(manifest.root / "manifest.json")
    columns = Columns(options.text_column, options.id_column, options.image_column, vision)
    files = discover_inputs([str(i) for i in inputs])
    details = check_inputs(files, columns)
    unit_rows = options.unit_rows or (IMAGE_UNIT_ROWS if options.image_column else TEXT_UNIT_ROWS)
    if options.provider:
        check_provider(options.provider)
    # A provider changes the numbers of integer graphs; keys of jobs that name none stay as
    # they were.
    key_options = {k: v for k, v in {**asdict(options), "unit_rows": unit_rows}.items()
                   if not (k == "provider" and v is None)}
    units = plan_units(files, details, unit_rows=unit_rows,
                       salt=job_salt(bundle_sha, key_options))
    root = str(manifest.root.resolve())
    job = {"bundle": root, "bundle_sha256": bundle_sha, "options": key_options,
           "inputs": [asdict(f) for f in files], "plan_sha256": plan_digest(units),
           "units": len(units)}
    settings = EmbedSettings(root, bundle_sha, options.precision, batch_size=options.batch_size,
                             dimensions=options.dimensions, query=options.query,
                             instruction=options.instruction, float16=options.float16,
                             provider=options.provider)
    logger.info("%d units planned over %d files", len(units), len(files))
    return JobPlan(manifest, settings, columns, units, job)


def embed_corpus(bundle: str | Path, inputs: Sequence[str], out: str | Path, *,
                 options: CorpusOptions | None = None, ray_options: RayOptions | None = None,
                 resume: bool = False, progress: bool = False) -> CorpusSummary:
    """Embed every record of ``inputs`` into Parquet parts under ``out``, exactly once.

    Args:
        bundle: a text or Qwen3-VL bundle directory (shared storage on a cluster).
        inputs: files, directories or globs (Parquet, JSONL, CSV, text).
        out: the output directory; must not exist unless ``resume``.
        options: what to embed and how.
        ray_options: where to run.
        resume: continue ``out``: keep committed units, discard partial ones, do the rest.
        progress: a progress bar on stderr (rows/s, units done).

    Returns:
        The summary; ``out/_manifest.json`` holds the same counts.

    Raises:
        InputError: bad options, an input that cannot be read (before any work starts).
        BundleError: the bundle is missing, corrupt, or lacks the precision.
        OutputError: ``out`` exists without ``resume`` or holds another job; the engine
            failed (committed units are kept for ``--resume``).
    """
    options = options or CorpusOptions()
    cluster = ray_options or RayOptions()
    started, clock = _now(), time.perf_counter()
    plan = plan_job(bundle, inputs, options)
    output = OutputDir(str(out))
    markers = output.open(plan.job, resume)
    pending = [u for u in plan.units if u.key not in markers]
    logger.info("%d of %d units to do", len(pending), len(plan.units))
    where, actors, threads = "nowhere (nothing was left to do)", 0, 0
    if pending:
        with ray_session(cluster.address, num_cpus=cluster.num_cpus, verbose=cluster.verbose,
                         object_store_memory=cluster.object_store_memory) as where:
            actors, threads, _ = plan_resources(cluster.actors, cluster.threads_per_actor,
                                                local=where.startswith("a local"))
            settings = replace(plan.settings, threads=threads)
            markers.update(run_pipeline(pending, settings, plan.columns, output, actors=actors,
                                        progress=progress))
    done = [markers[u.key] for u in plan.units]
    now = [markers[u.key] for u in pending]
    by_code: dict[str, int] = {}
    for error in (e for m in done for e in m["errors"]):
        by_code[error["code"]] = by_code.get(error["code"], 0) + 1
    summary = CorpusSummary(
        out=output.url, rows=sum(m["rows"] for m in done), errors=output.write_errors(done),
        errors_by_code=by_code, tokens=sum(m["tokens"] for m in done), units=len(plan.units),
        units_now=len(pending), rows_now=sum(m["rows"] for m in now),
        tokens_now=sum(m["tokens"] for m in now), seconds=time.perf_counter() - clock,
        where=where, actors=actors, threads_per_actor=threads)
    summary.manifest = _manifest(plan, options, summary, started, output, resume)
    output.write_manifest(summary.manifest)
    output.finish()
    return summary


def run_pipeline(pending: Sequence[Unit], settings: EmbedSettings, columns: Columns,
                 output: OutputDir, *, actors: int, progress: bool) -> dict[str, dict[str, Any]]:
    """Run the Ray Data pipeline over ``pending`` units, committing each as it completes.

    Returns:
        The markers of the units committed.

    Raises:
        OutputError: a unit never completed (the engine lost it); a rerun with --resume
            finishes the job.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    items = [{"unit": u.to_json()} for u in pending]
    ds = (ray.data.from_items(items, override_num_blocks=len(items))
          .map_batches(read_units, batch_size=1, batch_format="pyarrow",  # type: ignore[arg-type]
                       fn_kwargs={"columns": columns}, num_cpus=0,
                       compute=ray.data.TaskPoolStrategy(size=max(2, actors)))
          .map_batches(EmbedActor, batch_size=None, batch_format="pyarrow",
                       fn_constructor_kwargs={"settings": settings},
                       num_cpus=settings.threads,
                       compute=ray.data.ActorPoolStrategy(size=actors)))
    collector = UnitCollector(pending)
    markers: dict[str, dict[str, Any]] = {}
    with bar(sum(u.rows for u in pending), "embed-corpus", progress, unit="rows") as pbar:
        try:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for unit, rows in collector.add(table):
                    markers[unit.key] = output.commit(unit, rows)
                    pbar.update(unit.rows)
                    pbar.set_postfix_str(f"units {len(markers)}/{len(pending)}")
                    logger.debug("committed %s (%d rows)", unit.name, len(rows))
        except Qwen3EmbError:
            raise
        except Exception as e:  # the engine wraps the cause in several layers
            cause = failure_cause(e)
            if isinstance(cause, Qwen3EmbError):
                raise cause from e
            raise OutputError(f"the Ray job failed after {len(markers)} of {len(pending)} "
                              f"units: {cause}", hint="Committed units are kept; fix the cause "
                              "and rerun with --resume") from e
    missing = len(pending) - len(markers)
    if missing:
        raise OutputError(f"{missing} of {len(pending)} units did not complete",
                          hint="Rerun the same command with --resume to finish them")
    return markers


def failure_cause(error: BaseException) -> BaseException | str:
    """What made the engine fail: one of our errors if the chain holds one, else the last
    ``Type: message`` line of the remote traceback Ray puts in its messages, else ``error``."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not c for c in chain):
        chain.append(current)
        inner = getattr(current, "cause", None)
        current = inner if isinstance(inner, BaseException) else (
            current.__cause__ or current.__context__)
    for item in chain:
        if isinstance(item, Qwen3EmbError):
            return item
    for item in chain:
        for line in reversed(str(item).splitlines()):
            if re.match(r"^[\w.]+(Error|Exception|Exit)\b[^:]*: \S", line.strip()):
                return line.strip()
    return f"{type(error).__name__}: {one_line(error)}"


class UnitCollector:
    """Gathers streamed result rows per unit; yields a unit once all its rows arrived.

    A row seen twice (a task retried after a worker died) is kept once.
    """

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units = {u.key: u for u in units}
        self.parts: dict[str, list[Any]] = {}
        self.seen: dict[str, set[int]] = {}
        self.finished: set[str] = set()

    def add(self, table: Any) -> list[tuple[Unit, Any]]:
        """Add one result block; returns the units it completed, with their rows by ``_row``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        complete = []
        keys = table["_unit"]
        for key in pc.unique(keys).to_pylist():
            if key not in self.units or key in self.finished:
                continue
            rows = table.filter(pc.equal(keys, key))
            seen = self.seen.setdefault(key, set())
            keep = []
            for r in rows["_row"].to_pylist():
                keep.append(r not in seen)
                seen.add(r)
            self.parts.setdefault(key, []).append(rows.filter(pa.array(keep)))
            expected = rows["_n"][0].as_py()
            if expected == 0 or len(seen) == expected:
                whole = pa.concat_tables(self.parts.pop(key)).sort_by("_row")
                self.finished.add(key)
                complete.append((self.units[key], whole))
        return complete


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _manifest(plan: JobPlan, options: CorpusOptions, summary: CorpusSummary, started: str,
              output: OutputDir, resume: bool) -> dict[str, Any]:
    """``_manifest.json`` of a finished run: the job, its output, and every run so far."""
    from qwen3emb import __version__
    from qwen3emb.constants import DEFAULT_TASK, VL_DEFAULT_INSTRUCTION

    manifest, job = plan.manifest, plan.job
    vision = "vision" in manifest.data
    instruction = options.instruction or (
        VL_DEFAULT_INSTRUCTION if vision else DEFAULT_TASK if options.query else None)
    previous = output.read_manifest().get("runs", []) if resume else []
    run = {"started": started, "finished": _now(), "seconds": round(summary.seconds, 3),
           "where": summary.where, "actors": summary.actors,
           "threads_per_actor": summary.threads_per_actor, "units": summary.units_now,
           "rows": summary.rows_now, "tokens": summary.tokens_now,
           "rows_per_second": round(summary.rows_per_second, 2),
           "tokens_per_second": round(summary.tokens_per_second, 2)}
    return {
        "format": FORMAT, "format_version": 1, "status": "complete",
        "tool": {"name": "qwen3emb-export", "version": __version__},
        "libraries": describe_versions(),
        "bundle": {"path": job["bundle"], "sha256": job["bundle_sha256"],
                   "model": manifest.data.get("source", {}).get("model"),
                   "family": manifest.family},
        "embedding": {"dims": options.dimensions or int(manifest.embedding["output_dim"]),
                      "dtype": "float16" if options.float16 else "float32",
                      "precision": options.precision, "query": options.query,
                      "instruction": instruction},
        "columns": ["id", "embedding", "n_tokens", "truncated"],
        "rows": {"embedded": summary.rows, "skipped": summary.errors,
                 "input": summary.rows + summary.errors,
                 "skipped_by_reason": dict(sorted(summary.errors_by_code.items())),
                 "tokens": summary.tokens},
        "units": summary.units,
        "job": job,
        "runs": [*previous, run],
    }
