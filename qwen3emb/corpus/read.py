"""Read one unit into rows: the first stage of the pipeline, run in Ray tasks.

Every record becomes one row with an id; a record that cannot be embedded (no text, not a
string, empty, undecodable, an image file that cannot be read) becomes an error row carrying a
code and a reason instead, so it is reported rather than lost. A unit whose bytes cannot be read
at all turns into error rows for its planned records.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qwen3emb.corpus.inputs import Columns, one_line, open_fs
from qwen3emb.corpus.plan import Unit

logger = logging.getLogger(__name__)

MISSING, NOT_STRING, EMPTY, UNREADABLE, BAD_IMAGE, BAD_INPUT = (
    "missing", "not_string", "empty", "unreadable", "bad_image", "bad_input")
"""Error codes, counted by code in the summary and the manifest."""


@dataclass
class Row:
    """One record of a unit: what to embed, or why it cannot be."""

    id: str
    text: str | None = None
    image: bytes | None = None
    code: str | None = None
    reason: str | None = None


def read_schema() -> Any:
    """The Arrow schema of the read stage's output (fixed, so blocks always concatenate)."""
    import pyarrow as pa

    return pa.schema([("_unit", pa.string()), ("_row", pa.int64()), ("_n", pa.int64()),
                      ("id", pa.string()), ("text", pa.string()), ("image", pa.binary()),
                      ("_code", pa.string()), ("_reason", pa.string())])


def read_units(batch: Any, columns: Columns) -> Any:
    """Ray Data stage: a batch of unit descriptors (column ``unit``, JSON) → their rows.

    Each row carries its unit's key (``_unit``), its index in the unit (``_row``) and the
    unit's row count (``_n``), so the driver knows when a unit is complete. A unit without
    rows yields one placeholder row (``_row`` -1, ``_n`` 0) so that it is committed too.
    """
    import pyarrow as pa

    out: dict[str, list[Any]] = {name: [] for name in read_schema().names}
    for text in batch["unit"].to_pylist():
        unit = Unit.from_json(text)
        rows: list[Row | None] = [*read_unit(unit, columns)] or [None]
        for i, row in enumerate(rows):
            out["_unit"].append(unit.key)
            out["_row"].append(i if row is not None else -1)
            out["_n"].append(len(rows) if row is not None else 0)
            out["id"].append(row.id if row else None)
            out["text"].append(row.text if row else None)
            out["image"].append(row.image if row else None)
            out["_code"].append(row.code if row else None)
            out["_reason"].append(row.reason if row else None)
    return pa.Table.from_pydict(out, schema=read_schema())


def read_unit(unit: Unit, columns: Columns) -> Iterator[Row]:
    """The rows of one unit, in file order.

    Unreadable bytes become one error row per planned record (ids ``FILE:N``).
    """
    try:
        if unit.format == "parquet":
            rows = list(_parquet_rows(unit, columns))
        else:
            fs, path = open_fs(unit.url)
            with fs.open(path, "rb") as handle:
                handle.seek(unit.start)
                data = handle.read(unit.stop - unit.start)
            rows = list(_line_rows(unit, data, columns))
    except Exception as e:  # any reader error: report the unit's records, keep the job going
        reason = f"cannot read records {unit.first}-{unit.first + unit.rows - 1}: {one_line(e)}"
        logger.warning("%s: %s", unit.url, reason)
        ids = _parquet_ids(unit, columns) if unit.format == "parquet" else None
        rows = [Row(ids[i] if ids else f"{unit.url}:{unit.first + i}", code=UNREADABLE,
                    reason=reason) for i in range(unit.rows)]
    yield from rows


def _parquet_ids(unit: Unit, columns: Columns) -> list[str] | None:
    """The ids of a Parquet unit whose other columns are corrupt, if its id column reads."""
    import pyarrow.parquet as pq

    try:
        fs, path = open_fs(unit.url)
        with fs.open(path, "rb") as handle:
            pf = pq.ParquetFile(handle)
            name = columns.id or "id"
            if name not in pf.schema_arrow.names:
                return None
            ids = pf.read_row_group(unit.row_group, columns=[name])[name]
        values = ids.slice(unit.start, unit.stop - unit.start).to_pylist()
        return [f"{unit.url}:{unit.first + i}" if v is None else str(v)
                for i, v in enumerate(values)]
    except Exception:  # the id column is unreadable too
        return None


def _line_rows(unit: Unit, data: bytes, columns: Columns) -> Iterator[Row]:
    if unit.format == "csv":
        yield from _csv_rows(unit, data, columns)
        return
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    for i, raw in enumerate(lines):
        number = unit.first + i
        fallback = f"{unit.url}:{number}"
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            yield Row(fallback, code=UNREADABLE, reason=f"line {number} is not valid UTF-8")
            continue
        if unit.format == "text":
            yield (Row(fallback, text=line) if line else
                   Row(fallback, code=EMPTY, reason=f"line {number} is empty"))
            continue
        if not line.strip():
            continue  # blank lines in JSON Lines are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(fallback, code=UNREADABLE,
                      reason=f"line {number} is not valid JSON: {one_line(e)}")
            continue
        if not isinstance(record, dict):
            yield Row(fallback, code=UNREADABLE,
                      reason=f"line {number} is a JSON {type(record).__name__}, not an object")
            continue
        yield make_row(record, fallback, columns, unit.url)


def _csv_rows(unit: Unit, data: bytes, columns: Columns) -> Iterator[Row]:
    text = data.decode("utf-8", errors="surrogateescape")
    width = len(unit.header)
    for i, fields in enumerate(csv.reader(io.StringIO(text, newline=""))):
        fallback = f"{unit.url}:{unit.first + i}"
        if not fields:
            continue
        if len(fields) != width:
            yield Row(fallback, code=UNREADABLE,
                      reason=f"record has {len(fields)} fields, the header has {width}")
        elif any(_has_surrogates(v) for v in fields):
            yield Row(fallback, code=UNREADABLE, reason="record is not valid UTF-8")
        else:
            yield make_row(dict(zip(unit.header, fields)), fallback, columns, unit.url)


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet_rows(unit: Unit, columns: Columns) -> Iterator[Row]:
    import pyarrow.parquet as pq

    fs, path = open_fs(unit.url)
    with fs.open(path, "rb") as handle:
        pf = pq.ParquetFile(handle)
        names = pf.schema_arrow.names
        wanted = [c for c in (columns.id or "id", columns.text, columns.image)
                  if c is not None and c in names]
        table = pf.read_row_group(unit.row_group, columns=wanted)
    table = table.slice(unit.start, unit.stop - unit.start)
    for i, record in enumerate(table.to_pylist()):
        yield make_row(record, f"{unit.url}:{unit.first + i}", columns, unit.url)


def make_row(record: Mapping[str, Any], fallback_id: str, columns: Columns, source: str) -> Row:
    """Turn one record (a dict) into a row, or an error row that says what is wrong."""
    ident = record.get(columns.id or "id")
    row = Row(fallback_id if ident is None else str(ident))
    text = record.get(columns.text)
    if columns.image is not None:
        value = record.get(columns.image)
        if value is not None and value != "":  # CSV has no null: an empty field is no image
            row.image, row.reason = load_image(value, source)
            if row.reason is not None:
                row.code = UNREADABLE
                return row
    if text is None and row.image is None:
        wanted = f"'{columns.text}'" + (f" or '{columns.image}'" if columns.image else "")
        row.code, row.reason = MISSING, f"no {wanted} value"
    elif text is not None and not isinstance(text, str):
        row.code = NOT_STRING
        row.reason = f"'{columns.text}' is a {type(text).__name__}, not a string"
    elif text == "" and row.image is None:
        row.code, row.reason = EMPTY, f"'{columns.text}' is an empty string"
    else:
        row.text = text or None
    return row


def load_image(value: Any, source: str) -> tuple[bytes | None, str | None]:
    """Image bytes from a column value: bytes, a path (relative to the input file's folder, or
    any URL fsspec opens) or a ``{"bytes", "path"}`` struct (Hugging Face datasets).

    Returns:
        ``(bytes, None)``, or ``(None, reason)`` when the image cannot be read.
    """
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if not isinstance(value, str) or not value:
        return None, f"image value is a {type(value).__name__}, not a path or bytes"
    url = value if "://" in value or value.startswith("/") else posixpath.join(
        posixpath.dirname(source), value)
    try:
        fs, path = open_fs(url)
        with fs.open(path, "rb") as handle:
            return handle.read(), None
    except (OSError, ValueError) as e:
        return None, f"cannot read image '{value}': {getattr(e, 'strerror', None) or one_line(e)}"
