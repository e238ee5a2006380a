"""The output directory and its exactly-once commits.

Layout of OUT::

    part-000000-<key>.parquet   one per committed unit: id, embedding, n_tokens, truncated
    _done/<key>.json            the unit's done marker: rows, tokens, its error rows
    _tmp/                       files being written (discarded by --resume)
    _manifest.json              the job: bundle, options, plan; counts once complete
    _errors.jsonl               every row that could not be embedded: id, code, reason

A unit is committed when its marker exists: the part is written under ``_tmp/``, renamed into
place, then the marker is written under ``_tmp/`` and renamed into ``_done/``. A crash at any
point leaves either a committed unit or debris that ``--resume`` deletes (a part without a
marker, a marker whose part is missing or has another size, anything in ``_tmp/``). Readers
that skip ``_``-prefixed names (pyarrow, Spark, DuckDB, Ray) see only committed parts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from qwen3emb.corpus.inputs import display_url, is_local, open_fs
from qwen3emb.corpus.plan import Unit
from qwen3emb.errors import OutputError

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
DONE = "_done"
TMP = "_tmp"
FORMAT = "qwen3emb-corpus"


class OutputDir:
    """OUT on any fsspec filesystem; renames are atomic on local and POSIX filesystems.

    Args:
        out: the output directory (path or URL).
    """

    def __init__(self, out: str) -> None:
        self.fs, self.root = open_fs(str(out))
        self.url = display_url(self.fs, self.root)
        self.local = is_local(self.fs)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # --- opening --------------------------------------------------------------------------

    def open(self, job: dict[str, Any], resume: bool) -> dict[str, dict[str, Any]]:
        """Create OUT, or reopen it with ``resume``; returns the markers of committed units.

        Args:
            job: what identifies the job (bundle sha256, options, plan digest); written to
                ``_manifest.json`` and compared on resume.
            resume: continue an existing OUT.

        Raises:
            OutputError: OUT exists without ``resume``; or it holds another job's output.
        """
        exists = self.fs.exists(self.root) and bool(self.fs.ls(self.root))
        if exists and not resume:
            raise OutputError(f"output '{self.url}' already exists",
                              hint="Pass --resume to continue that job, or choose a new -o")
        if exists:
            self._check_same_job(job)
            committed = self._clean()
        else:
            committed = {}
            self.fs.makedirs(self.root, exist_ok=True)
        self.fs.makedirs(self.path(DONE), exist_ok=True)
        self.fs.makedirs(self.path(TMP), exist_ok=True)
        if not exists:
            self.write_manifest({"format": FORMAT, "status": "running", "job": job})
        return committed

    def _check_same_job(self, job: dict[str, Any]) -> None:
        old = self.read_manifest()
        if old.get("format") != FORMAT:
            raise OutputError(f"'{self.url}' exists but is not an embed-corpus output "
                              f"(no readable {MANIFEST})",
                              hint="Choose a new -o; --resume only continues a job's own OUT")
        before = old.get("job", {})
        changed = [name for name in ("bundle_sha256", "options", "inputs", "plan_sha256")
                   if before.get(name) != job.get(name)]
        if len(changed) > 1 and "plan_sha256" in changed:
            changed.remove("plan_sha256")  # follows from the others
        if changed:
            what = {"bundle_sha256": "bundle", "options": "options",
                    "inputs": "input files", "plan_sha256": "unit plan"}
            raise OutputError(
                f"'{self.url}' holds a job with a different "
                f"{' and '.join(what[c] for c in changed)}; resuming would mix two jobs",
                hint="Rerun with the first run's bundle, inputs and options, or choose a new -o")

    def _clean(self) -> dict[str, dict[str, Any]]:
        """Delete partial work and return the markers of committed units."""
        if self.fs.exists(self.path(TMP)):
            self.fs.rm(self.path(TMP), recursive=True)
        markers: dict[str, dict[str, Any]] = {}
        parts = {p.rsplit("/", 1)[-1]: p for p in self._list("part-")}
        for path in self._list(DONE + "/"):
            try:
                with self.fs.open(path, "rb") as handle:
                    marker = json.load(handle)
                part = parts.get(marker["part"]) if marker.get("part") else None
                ok = marker.get("part") is None or (
                    part is not None and self.fs.size(part) == marker["part_size"])
            except (OSError, ValueError, KeyError):
                ok = False
            if ok:
                markers[marker["key"]] = marker
            else:
                logger.info("discarding the partial unit of marker %s", path)
                self.fs.rm(path)
        kept = {m["part"] for m in markers.values() if m.get("part")}
        for name, path in parts.items():
            if name not in kept:
                logger.info("discarding %s: it was never committed", name)
                self.fs.rm(path)
        return markers

    def _list(self, prefix: str) -> list[str]:
        folder, _, start = prefix.rpartition("/")
        where = self.path(folder) if folder else self.root
        if not self.fs.exists(where):
            return []
        return sorted(p for p in self.fs.ls(where, detail=False)
                      if p.rsplit("/", 1)[-1].startswith(start))

    # --- committing -----------------------------------------------------------------------

    def commit(self, unit: Unit, table: Any) -> dict[str, Any]:
        """Commit one complete unit: its good rows to a part, its error rows to its marker.

        Args:
            unit: the unit.
            table: the embedding stage's rows of this unit, sorted by ``_row``.

        Returns:
            The marker written.
        """
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        good = table.filter(pc.and_(pc.is_null(table["_code"]),
                                    pc.greater_equal(table["_row"], 0)))
        bad = table.filter(pc.is_valid(table["_code"]))
        marker: dict[str, Any] = {
            "key": unit.key, "url": unit.url, "first": unit.first, "rows": len(good),
            "tokens": int(pc.sum(good["n_tokens"]).as_py() or 0) if len(good) else 0,
            "errors": [{"id": i, "code": c, "reason": r} for i, c, r in zip(
                bad["id"].to_pylist(), bad["_code"].to_pylist(), bad["_reason"].to_pylist())],
            "part": None, "part_size": 0, "committed": round(time.time(), 3)}
        if len(good):
            buffer = io.BytesIO()
            pq.write_table(good.select(["id", "embedding", "n_tokens", "truncated"]), buffer)
            name = unit.name + ".parquet"
            self._write_atomic(name, buffer.getvalue())
            marker.update(part=name, part_size=len(buffer.getvalue()))
        self._write_atomic(f"{DONE}/{unit.key}.json", json.dumps(marker).encode())
        return marker

    def _write_atomic(self, name: str, data: bytes) -> None:
        """Write ``data`` under ``_tmp/`` and rename it to ``name`` (fsync'd when local)."""
        tmp = self.path(TMP, name.replace("/", "-") + ".partial")
        final = self.path(name)
        if self.local:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            _fsync_dir(os.path.dirname(final))
        else:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)

    # --- finishing ------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any]:
        """``_manifest.json`` as written so far (empty when unreadable)."""
        try:
            with self.fs.open(self.path(MANIFEST), "rb") as handle:
                return dict(json.load(handle))
        except (OSError, ValueError):
            return {}

    def write_manifest(self, data: dict[str, Any]) -> None:
        self._write_atomic(MANIFEST, (json.dumps(data, indent=2, ensure_ascii=False)
                                      + "\n").encode())

    def write_errors(self, markers: Iterable[dict[str, Any]]) -> int:
        """Write ``_errors.jsonl`` from the markers, in unit order; returns the line count."""
        lines = [json.dumps({**error, "file": m["url"]}, ensure_ascii=False)
                 for m in markers for error in m["errors"]]
        self._write_atomic(ERRORS, "".join(line + "\n" for line in lines).encode())
        return len(lines)

    def finish(self) -> None:
        """Remove the empty ``_tmp/`` of a complete job."""
        if self.fs.exists(self.path(TMP)) and not self.fs.ls(self.path(TMP)):
            self.fs.rm(self.path(TMP), recursive=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
