"""Find a corpus's input files and check, before any work starts, that each one can be read.

INPUT arguments are files, directories (searched recursively) or globs, on any filesystem fsspec
opens (local paths, ``s3://``, ``gs://``, ``hdfs://``, ``memory://`` ...). The format follows the
extension: Parquet, JSON Lines, CSV or plain text (one document per line).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwen3emb.errors import InputError

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv",
    ".txt": "text", ".text": "text",
}
"""File extension → input format."""

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Columns:
    """Which fields of a record hold what.

    Args:
        text: the text column (records of plain-text files are their lines).
        id: the id column; ``None`` means ``id`` where a file has it, else ``FILE:N``.
        image: the image column (paths or bytes; Qwen3-VL bundles only).
        vision: the bundle is a Qwen3-VL bundle (a row may be an image without text).
    """

    text: str = "text"
    id: str | None = None
    image: str | None = None
    vision: bool = False


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, its format, and what identifies its content."""

    url: str
    format: str
    size: int
    version: str
    """mtime (or ETag/generation on object stores): a changed file gets new unit keys."""


def one_line(error: BaseException) -> str:
    """A backend error's message on one line (pyarrow's span several)."""
    return " ".join(str(error).split()).rstrip(".")


def open_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def display_url(fs: Any, path: str) -> str:
    """How a file is named in ids and messages: plain paths locally, full URLs elsewhere."""
    return path if is_local(fs) else str(fs.unstrip_protocol(path))


def is_local(fs: Any) -> bool:
    """Whether ``fs`` is the local filesystem."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def format_of(path: str) -> str | None:
    """The input format of ``path`` from its extension, or ``None``."""
    lower = path.lower()
    return next((fmt for ext, fmt in FORMATS.items() if lower.endswith(ext)), None)


def _version(info: dict[str, Any]) -> str:
    for key in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag",
                "generation", "created"):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return "unversioned"


def discover_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Expand INPUT arguments into the list of files to embed, in a stable order.

    Directories are searched recursively for files with a known extension (names starting with
    ``.`` or ``_`` are skipped, as Parquet tools do); globs are expanded.

    Raises:
        InputError: an input that does not exist, matches nothing, or has an unknown extension.
    """
    if not inputs:
        raise InputError("no INPUT given", hint="Pass files, directories or globs to embed")
    found: dict[str, InputFile] = {}
    for raw in inputs:
        fs, path = open_fs(str(raw))
        if any(c in path for c in _GLOB_CHARS):
            paths = [p for p in sorted(fs.glob(path)) if fs.isfile(p)]
            explicit = False
        elif fs.isdir(path):
            paths = sorted(fs.find(path))
            explicit = False
        elif fs.exists(path):
            paths, explicit = [path], True
        else:
            raise InputError(f"input '{raw}' does not exist",
                             hint="Check the path; globs and directories are accepted too")
        kept = [p for p in paths if explicit or (format_of(p) and not _hidden(p, path))]
        if not kept:
            raise InputError(f"input '{raw}' holds no Parquet, JSONL, CSV or text files",
                             hint=f"Known extensions: {', '.join(FORMATS)}")
        for p in kept:
            fmt = format_of(p)
            if fmt is None:
                raise InputError(f"cannot tell the format of '{raw}' from its extension",
                                 hint=f"Rename it with one of: {', '.join(FORMATS)}")
            info = fs.info(p)
            url = display_url(fs, p)
            found.setdefault(url, InputFile(url, fmt, int(info.get("size") or 0),
                                            _version(info)))
    return list(found.values())


def _hidden(path: str, root: str) -> bool:
    rel = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def check_inputs(files: Sequence[InputFile], columns: Columns) -> dict[str, dict[str, Any]]:
    """Open every file once and check what can be checked before work starts.

    Returns:
        Per url: ``columns`` (names, for Parquet and CSV) and, for Parquet, ``row_groups``
        (rows per row group).

    Raises:
        InputError: naming the first file that cannot be read, is not valid Parquet, or lacks a
            column the options name (or holds a non-string text column).
    """
    details: dict[str, dict[str, Any]] = {}
    for f in files:
        fs, path = open_fs(f.url)
        try:
            with fs.open(path, "rb") as handle:
                handle.read(1)
                if f.format == "parquet":
                    details[f.url] = _parquet_details(handle, f.url)
                elif f.format == "csv":
                    details[f.url] = {"columns": _csv_header(handle)}
                else:
                    details[f.url] = {}
        except InputError:
            raise
        except OSError as e:
            raise InputError(f"cannot read input '{f.url}': {e.strerror or one_line(e)}",
                             hint="Check the path and its permissions") from e
        _check_columns(f, details[f.url], columns)
    return details


def _parquet_details(handle: Any, url: str) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    handle.seek(0)
    try:
        meta = pq.ParquetFile(handle)
        groups = [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)]
        schema = meta.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"input '{url}' is not a readable Parquet file: {one_line(e)}",
                         hint="Check the file, or remove it from INPUT") from e
    return {"columns": list(schema.names), "row_groups": groups,
            "types": {name: str(schema.field(name).type) for name in schema.names}}


def _csv_header(handle: Any) -> list[str]:
    handle.seek(0)
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="")
    try:
        return next(csv.reader(text))
    except StopIteration:
        return []
    finally:
        text.detach()


def _check_columns(f: InputFile, details: dict[str, Any], columns: Columns) -> None:
    names = details.get("columns")
    if names is None:  # text and JSONL: checked per record
        return
    available = ", ".join(names) or "none"
    if columns.id is not None and columns.id not in names:
        raise InputError(f"input '{f.url}' has no id column '{columns.id}' "
                         f"(columns: {available})", hint="Pass --id-column with one of them")
    if columns.image is not None and columns.image not in names:
        raise InputError(f"input '{f.url}' has no image column '{columns.image}' "
                         f"(columns: {available})", hint="Pass --image-column with one of them")
    if columns.text not in names and not (columns.vision and columns.image):
        raise InputError(f"input '{f.url}' has no text column '{columns.text}' "
                         f"(columns: {available})", hint="Pass --text-column with one of them")
    kind = details.get("types", {}).get(columns.text)
    if kind is not None and "string" not in kind and kind != "null":
        raise InputError(f"column '{columns.text}' of '{f.url}' holds {kind}, not strings",
                         hint="Pass --text-column with a string column")
