"""The job summary: one flat Parquet row per scan (Athena-queryable), written in parts as the job streams."""

from __future__ import annotations

import io
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq

from ray_app import storage
from ray_app.core.errors import InvalidSummary
from ray_app.storage.artifacts import CONTENT_TYPES

#: One row per scan. Flat, Athena-friendly types; timestamps in milliseconds (Athena's safest Parquet form).
SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string()),
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("model_key", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
        pa.field("input_uri", pa.string()),
        pa.field("mask_uri", pa.string()),
        pa.field("passport_uri", pa.string()),
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
        pa.field("read_s", pa.float64()),
        pa.field("segment_s", pa.float64()),
        pa.field("passport_s", pa.float64()),
        pa.field("write_s", pa.float64()),
        pa.field("total_s", pa.float64()),
        pa.field("structures_present", pa.int32()),
        pa.field("liver_ml", pa.float64()),
        pa.field("spleen_ml", pa.float64()),
        pa.field("kidney_left_ml", pa.float64()),
        pa.field("kidney_right_ml", pa.float64()),
        pa.field("pancreas_ml", pa.float64()),
        # What the scan used and wrote, for ``ray-app cost``: the segmentation actor's share of its node (CPUs
        # reserved and torch threads; GPUs) and the CPUs of the machine it ran on; every object written and
        # its bytes, those over LARGE_OBJECT_BYTES apart (the lifecycle rule moves them to Glacier IR); the
        # size of its DynamoDB item and of the item's copy in the job index (``dynamodb_item``).
        pa.field("actor_cpus", pa.float64()),
        pa.field("actor_gpus", pa.float64()),
        pa.field("node_cpus", pa.int32()),
        pa.field("objects_written", pa.int32()),
        pa.field("bytes_written", pa.int64()),
        pa.field("large_objects_written", pa.int32()),
        pa.field("large_bytes_written", pa.int64()),
        pa.field("store_item_bytes", pa.int32()),
        pa.field("store_index_bytes", pa.int32()),
    ]
)


def summary_table(rows: list[dict]) -> pa.Table:
    """Rows as a table with :data:`SUMMARY_SCHEMA`; missing columns are null, unknown ones an error."""
    names = set(SUMMARY_SCHEMA.names)
    clean = []
    for i, row in enumerate(rows):
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"summary row {i}: unknown columns {sorted(unknown)}")
        for required in ("scan_id", "status"):
            if row.get(required) is None:
                raise ValueError(f"summary row {i}: {required} is required")
        finished = row.get("finished_at")
        if isinstance(finished, str):
            row = {**row, "finished_at": datetime.fromisoformat(finished)}
        clean.append(row)
    try:
        return pa.Table.from_pylist(clean, schema=SUMMARY_SCHEMA)
    except (pa.ArrowException, TypeError) as exc:
        raise ValueError(f"summary rows do not fit the schema: {exc}") from exc


def write_summary(rows: list[dict], uri: str) -> str:
    """Write summary rows as one Parquet file (via :func:`storage.write_bytes`, so SSE applies)."""
    buf = io.BytesIO()
    pq.write_table(summary_table(rows), buf, compression="snappy")
    return storage.write_bytes(uri, buf.getvalue(), CONTENT_TYPES[".parquet"])


def summary_parts(uri: str) -> list[str]:
    """The Parquet files of a job summary: the one file an older job wrote at ``uri``, or the parts a batch job
    writes under ``uri/`` while it runs (``summary.parquet/<part>.parquet``, the layout Spark and Athena read
    as one table)."""
    if storage.exists(uri):
        return [uri]
    parts = [p for p in storage.list_uris(uri.rstrip("/") + "/") if p.endswith(".parquet")]
    if not parts:
        raise storage.ObjectNotFound(f"no job summary at {uri}")
    return parts


def clear_summary(uri: str) -> None:
    """Remove a job summary (the file or its parts), so that a job run again under its id writes a fresh one
    instead of adding parts to the last run's."""
    for found in storage.list_uris(uri):
        if found == uri or found.startswith(uri.rstrip("/") + "/"):
            storage.delete(found)


def read_summary_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A job summary (one file or its parts, local or s3://) as one table, optionally only some columns.

    ParquetFile, not ``pq.read_table``: read_table's dataset scanner leaves Arrow threads that abort the process
    at exit about half the time (apache/arrow#34314; 20 of 40 runs with pyarrow 26, 0 of 120 this way).
    """
    tables = [_read_part(p, columns) for p in summary_parts(uri)]
    return pa.concat_tables(tables, promote_options="default")


def _read_part(uri: str, columns: list[str] | None) -> pa.Table:
    try:
        return pq.ParquetFile(io.BytesIO(storage.read_bytes(uri))).read(columns=columns)
    except pa.ArrowInvalid as exc:
        raise InvalidSummary(f"{uri} is not a job summary (Parquet): {exc}") from exc


def read_summary(uri: str) -> list[dict]:
    """The rows of a job summary (local or s3://)."""
    return read_summary_table(uri).to_pylist()
