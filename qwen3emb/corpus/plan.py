"""Split input files into units: the pieces a corpus job embeds and commits one at a time.

A unit is a range of one file: rows of one Parquet row group, or whole records (lines; CSV
records, whose quoted fields may span lines) between two byte offsets of a line-based file. Its
key hashes the file (path, size, version), the range and the job's salt (bundle sha256 +
options), so the same inputs and options always give the same keys and a changed file or option
gives new ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qwen3emb.corpus.inputs import InputFile, open_fs

_SCAN_CHUNK = 8 << 20
_NEWLINE, _QUOTE = 10, 34


@dataclass(frozen=True)
class Unit:
    """One unit of work. JSON-serializable: it travels to the read tasks as a string.

    Attributes:
        key: deterministic id (hex), also the name of its output part.
        index: position in the plan; parts are named ``part-{index}-{key}`` so that a sorted
            listing follows the input order.
        url: the input file.
        format: ``parquet``, ``jsonl``, ``csv`` or ``text``.
        start, stop: byte range (line formats) or row range within ``row_group`` (Parquet).
        first: number of the unit's first record in its file (1-based: line number for text
            and JSONL, data row for CSV and Parquet).
        rows: records planned (blank JSONL/CSV lines among them are not rows).
        row_group: Parquet row group, -1 otherwise.
        header: CSV column names.
    """

    key: str
    index: int
    url: str
    format: str
    start: int
    stop: int
    first: int
    rows: int
    row_group: int = -1
    header: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """File stem of the unit's output part and marker."""
        return f"part-{self.index:06d}-{self.key}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Unit:
        data = json.loads(text)
        data["header"] = tuple(data.get("header", ()))
        return cls(**data)


def job_salt(bundle_sha256: str, options: dict[str, Any]) -> str:
    """What every unit key of a job shares: the bundle's sha256 and the options that change
    the output (precision, dimensions, instruction, columns, batch size, ...)."""
    text = json.dumps({"bundle": bundle_sha256, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _key(salt: str, f: InputFile, *parts: Any) -> str:
    text = json.dumps([salt, f.url, f.size, f.version, f.format, *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan_units(files: Sequence[InputFile], details: dict[str, dict[str, Any]], *,
               unit_rows: int, salt: str) -> list[Unit]:
    """Cut every file into units of at most ``unit_rows`` records.

    Parquet files are cut from their footer's row counts; line-based files are scanned once
    for record boundaries (fast: numpy over 8 MiB chunks).

    Args:
        files: from :func:`~qwen3emb.corpus.inputs.discover_inputs`.
        details: from :func:`~qwen3emb.corpus.inputs.check_inputs`.
        unit_rows: records per unit.
        salt: from :func:`job_salt`.

    Returns:
        The units in input order.
    """
    units: list[Unit] = []
    for f in files:
        if f.format == "parquet":
            ranges = list(_parquet_ranges(details[f.url]["row_groups"], unit_rows))
            header: tuple[str, ...] = ()
        else:
            ranges, header = _line_ranges(f, unit_rows)
        for group, start, stop, first, rows in ranges:
            units.append(Unit(_key(salt, f, group, start, stop), len(units), f.url, f.format,
                              start, stop, first, rows, group, header))
    return units


def plan_digest(units: Sequence[Unit]) -> str:
    """One hash over every unit key: equal plans, equal digests."""
    return hashlib.sha256("\n".join(u.key for u in units).encode()).hexdigest()


def _parquet_ranges(groups: Sequence[int], unit_rows: int
                    ) -> Iterator[tuple[int, int, int, int, int]]:
    first = 1
    for group, total in enumerate(groups):
        for start in range(0, total, unit_rows):
            stop = min(total, start + unit_rows)
            yield group, start, stop, first + start, stop - start
        first += total


def _line_ranges(f: InputFile, unit_rows: int
                 ) -> tuple[list[tuple[int, int, int, int, int]], tuple[str, ...]]:
    header: tuple[str, ...] = ()
    need_header = f.format == "csv"
    ranges: list[tuple[int, int, int, int, int]] = []
    start, count, first, last = 0, 0, 1, 0
    for ends in _record_ends(f):
        if need_header and len(ends):
            header, need_header = _parse_header(f, int(ends[0])), False
            start = last = int(ends[0])
            ends = ends[1:]
        # Cut after every unit_rows-th record (count records are already in the open unit).
        for cut in ends[unit_rows - count - 1::unit_rows]:
            ranges.append((-1, start, int(cut), first, unit_rows))
            start, first = int(cut), first + unit_rows
        count = (count + len(ends)) % unit_rows
        last = int(ends[-1]) if len(ends) else last
    if count:
        ranges.append((-1, start, last, first, count))
    return ranges, header


def _record_ends(f: InputFile) -> Iterator[np.ndarray]:
    """Byte offsets just past each record, chunk by chunk; a last record without a final
    newline ends at the end of the file."""
    last = 0
    for ends in _newline_ends(f):
        if len(ends):
            last = int(ends[-1])
        yield ends
    if f.size > last:
        yield np.array([f.size], dtype=np.int64)


def _newline_ends(f: InputFile) -> Iterator[np.ndarray]:
    """Offsets just past each record-ending newline.

    For CSV a newline ends a record only outside quotes: the count of ``"`` before it is even
    (RFC 4180 escapes a quote by doubling it, which keeps the parity).
    """
    fs, path = open_fs(f.url)
    offset, quotes = 0, 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_SCAN_CHUNK):
            data = np.frombuffer(chunk, dtype=np.uint8)
            ends = np.flatnonzero(data == _NEWLINE)
            if f.format == "csv":
                quote_at = np.flatnonzero(data == _QUOTE)
                ends = ends[(quotes + np.searchsorted(quote_at, ends)) % 2 == 0]
                quotes += len(quote_at)
            yield ends.astype(np.int64) + offset + 1
            offset += len(chunk)


def _parse_header(f: InputFile, end: int) -> tuple[str, ...]:
    import csv
    import io

    fs, path = open_fs(f.url)
    with fs.open(path, "rb") as handle:
        raw = handle.read(end)
    row = next(csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"), newline="")), [])
    return tuple(row)
