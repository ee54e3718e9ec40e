"""Read a batch manifest (CSV, JSONL or Parquet; local or S3) into runnable rows and reported problems.

A manifest problem with the whole file (unreadable format, missing ``scan_id``/``uri`` column) raises one
:class:`ManifestError`. A problem with a row never stops the others: the row is left out of ``rows`` and
listed in ``problems`` with its number, so nothing is dropped silently.

Row numbers count data records from 1 (a CSV header is not counted; blank lines are): for JSONL the row
number is the line number, for CSV without quoted line breaks it is the line number minus one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_app import storage
from ray_app.core.errors import ManifestError
from ray_app.storage.keys import InvalidId, looks_like_formula, validate_scan_id

REQUIRED_COLUMNS = ("scan_id", "uri")
DEFAULT_MAX_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class ManifestProblem:
    """One row that will not run. ``code`` is one of: empty_row, malformed_row, missing_field, not_utf8,
    formula_injection, invalid_scan_id, duplicate_scan_id, invalid_uri. ``scan_id`` is set only when valid."""

    row: int
    code: str
    message: str
    scan_id: str | None = None


@dataclass
class ManifestResult:
    rows: list[dict[str, Any]]
    problems: list[ManifestProblem]
    columns: list[str] = field(default_factory=list)


class _RowProblem(Exception):
    def __init__(self, code: str, message: str, scan_id: str | None = None):
        super().__init__(message)
        self.problem = (code, message, scan_id)


def read_manifest(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> ManifestResult:
    """Parse by extension (``.csv``, ``.jsonl``/``.ndjson``, ``.parquet``) and validate every row."""
    columns, records = parse_manifest(uri, max_bytes)
    rows: list[dict[str, Any]] = []
    problems: list[ManifestProblem] = []
    for item in check_records(records):
        if isinstance(item, ManifestProblem):
            problems.append(item)
        else:
            rows.append(item)
    return ManifestResult(rows=rows, problems=problems, columns=columns)


def parse_manifest(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[str], Records]:
    """The manifest's columns and numbered raw records; raises :class:`ManifestError` for the whole file."""
    columns, records = parser_for(uri)(storage.read_bytes(uri, max_bytes=max_bytes))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing and (columns or not records):
        raise ManifestError(f"manifest {uri} lacks required column(s) {missing}; found {columns}")
    return columns, records


def check_manifest_exists(uri: str) -> None:
    """Refuse a manifest of an unsupported format, or one that is not there, with its :class:`ManifestError`:
    cheap checks (the name, one HEAD) that the batch job makes before it writes or starts anything."""
    parser_for(uri)
    try:
        found = storage.exists(uri)
    except storage.StorageError as exc:  # e.g. AccessDenied: these credentials may not read it
        raise unreadable_manifest(uri, exc) from exc
    if not found:
        raise ManifestError(f"manifest {uri} does not exist")


def unreadable_manifest(uri: str, exc: storage.StorageError) -> ManifestError:
    """The :class:`ManifestError` for a manifest that storage could not read (gone, denied, too large)."""
    return ManifestError(f"cannot read manifest {uri}: {exc.message}")


def parser_for(uri: str) -> Callable[[bytes], tuple[list[str], Records]]:
    """The parser for the manifest's format, told by its extension (checked before anything is read)."""
    lower = uri.lower()
    if lower.endswith(".csv"):
        return _csv_records
    if lower.endswith((".jsonl", ".ndjson")):
        return _jsonl_records
    if lower.endswith(".parquet"):
        return _parquet_records
    raise ManifestError(f"unsupported manifest format {uri!r}: use .csv, .jsonl or .parquet")


def check_records(records: Records) -> Iterator[dict[str, Any] | ManifestProblem]:
    """Each record in order as its cleaned row or its problem. Sequential on purpose: a duplicate is told from
    the first row with its id only by seeing every row before it."""
    first_row: dict[str, int] = {}
    for number, record in records:
        try:
            if isinstance(record, _RowProblem):
                raise record
            yield _check(record, number, first_row)
        except _RowProblem as problem:
            yield ManifestProblem(number, *problem.problem)


def _check(record: dict[str, Any], number: int, first_row: dict[str, int]) -> dict[str, Any]:
    """Validate one record; returns the cleaned row or raises :class:`_RowProblem`."""
    if all(v is None or (isinstance(v, (str, bytes)) and not v.strip()) for v in record.values()):
        raise _RowProblem("empty_row", "row is empty")
    record = {k: _text(k, v) for k, v in record.items()}

    scan_id = _required_text(record, "scan_id")
    if looks_like_formula(scan_id):
        raise _RowProblem("formula_injection", f"scan_id {scan_id!r} looks like a spreadsheet formula")
    try:
        validate_scan_id(scan_id)
    except InvalidId as exc:
        raise _RowProblem("invalid_scan_id", exc.message) from None
    if scan_id in first_row:
        raise _RowProblem(
            "duplicate_scan_id", f"scan_id {scan_id!r} already appears in row {first_row[scan_id]}", scan_id
        )
    first_row[scan_id] = number

    uri = _required_text(record, "uri", scan_id)
    if looks_like_formula(uri):
        raise _RowProblem("formula_injection", f"uri {uri!r} looks like a spreadsheet formula", scan_id)
    try:
        storage.parse_uri(uri)
    except storage.UnsupportedUri as exc:
        raise _RowProblem("invalid_uri", exc.message, scan_id) from None
    return {**record, "scan_id": scan_id, "uri": uri}


def _text(column: str, value: Any) -> Any:
    """Bytes must be UTF-8; strings must hold no undecodable bytes (CSV is decoded with surrogateescape)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _RowProblem("not_utf8", f"column {column!r} is not valid UTF-8 text") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _RowProblem("not_utf8", f"column {column!r} is not valid UTF-8 text") from None
    return value


def _required_text(record: dict[str, Any], column: str, scan_id: str | None = None) -> str:
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _RowProblem("missing_field", f"{column} is missing", scan_id)
    if not isinstance(value, str):
        raise _RowProblem("malformed_row", f"{column} must be text, got {type(value).__name__}", scan_id)
    return value.strip(" ")  # only spaces: tabs and other control characters stay visible to validation


Records = list[tuple[int, "dict[str, Any] | _RowProblem"]]


def _csv_records(data: bytes) -> tuple[list[str], Records]:
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise ManifestError("manifest is empty: the first line must be a header such as 'scan_id,uri'")
        columns = [h.strip() for h in header]
        if any(not c for c in columns) or len(set(columns)) != len(columns):
            raise ManifestError(f"manifest header has empty or repeated column names: {columns}")
        try:
            "".join(columns).encode("utf-8")
        except UnicodeEncodeError:
            raise ManifestError("manifest header is not valid UTF-8") from None
        records: Records = []
        for number, fields in enumerate(reader, start=1):
            if fields and len(fields) != len(columns):
                message = f"expected {len(columns)} fields, got {len(fields)}"
                records.append((number, _RowProblem("malformed_row", message)))
            else:
                records.append((number, dict(zip(columns, fields)) if fields else {}))
    except csv.Error as exc:
        raise ManifestError(f"manifest is not valid CSV near line {reader.line_num}: {exc}") from exc
    return columns, records


def _jsonl_lines(data: bytes) -> Iterator[tuple[int, dict[str, Any] | _RowProblem]]:
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, _RowProblem("not_utf8", "line is not valid UTF-8 text")
            continue
        if not line.strip():
            yield number, {}
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, _RowProblem("malformed_row", f"not valid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(obj, dict):
            yield number, _RowProblem("malformed_row", f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield number, obj


def _jsonl_records(data: bytes) -> tuple[list[str], Records]:
    records: Records = list(_jsonl_lines(data))
    columns: dict[str, None] = {}
    for _, record in records:
        if isinstance(record, dict):
            columns.update(dict.fromkeys(record))
    return list(columns), records


def _parquet_records(data: bytes) -> tuple[list[str], Records]:
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()  # read_table's threads can abort the exit: read_summary
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"manifest is not a readable Parquet file: {exc}") from exc
    return table.column_names, list(enumerate(table.to_pylist(), start=1))
