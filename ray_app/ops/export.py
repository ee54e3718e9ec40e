"""``ray-app export``: a job's passports as one table (Parquet or CSV) for pandas, spreadsheets or Athena.

One row per scan and model: ``scan_id``, ``status``, ``error_code``, ``model``, ``created_at``, then one
``<structure>_ml`` column per structure (sorted by name; empty where the scan failed or lacks it).

Only ``status``, ``created_at``, ``error.code``, ``model.key`` and ``structures.<name>.volume_ml`` /
``present`` are read from the documents ``PassportStore.list_by_job`` returns, so the full passport and a
compact store item (status, model, presence and volume per structure, a pointer to passport.json) both
export the same. An absent structure (``present: false``) exports as 0 ml, as the passport measures it.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys

FIXED = ("scan_id", "status", "error_code", "model", "created_at")


def _model_key(doc: dict) -> str | None:
    model = doc.get("model")
    if isinstance(model, dict):
        return model.get("key")
    return model if isinstance(model, str) else doc.get("model_key")


def _volume(entry) -> float | None:
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry)
    if not isinstance(entry, dict):
        return None
    v = entry.get("volume_ml")
    if v is None and entry.get("present") is False:
        return 0.0
    return None if v is None else float(v)


def passport_row(doc: dict) -> dict:
    """The flat row of one passport (full or compact form)."""
    error = doc.get("error")
    code = error.get("code") if isinstance(error, dict) else doc.get("error_code")
    row = {
        "scan_id": doc.get("scan_id"),
        "status": doc.get("status"),
        "error_code": code,
        "model": _model_key(doc),
        "created_at": doc.get("created_at"),
    }
    for name, entry in (doc.get("structures") or {}).items():
        row[f"{name}_ml"] = _volume(entry)
    return row


def export_rows(docs: list[dict]) -> tuple[list[str], list[dict]]:
    """Columns (fixed ones, then every structure's ``_ml`` sorted) and rows sorted by scan and model."""
    rows = sorted((passport_row(d) for d in docs), key=lambda r: (r["scan_id"] or "", r["model"] or ""))
    volumes = sorted({k for r in rows for k in r} - set(FIXED))
    return [*FIXED, *volumes], rows


def to_bytes(columns: list[str], rows: list[dict], fmt: str) -> bytes:
    if fmt == "csv":
        from ray_app.storage.keys import looks_like_formula

        def cell(v):  # ids are validated formula-free when stored; text from another store form is not trusted
            return "'" + v if isinstance(v, str) and looks_like_formula(v) else v

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: cell(v) for k, v in r.items()} for r in rows)
        return text.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([pa.field(c, pa.string() if c in FIXED else pa.float64()) for c in columns])
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    return buf.getvalue()


def export_job(job_id: str, passports: str, out: str) -> int:
    """Write the job's passports to ``out`` (``.parquet`` or ``.csv``, local or s3://); returns the row count.

    No passports (a mistyped job id, the wrong store): nothing is written, so no empty table passes for a job."""
    from ray_app import storage
    from ray_app.storage.sinks import open_passport_store

    fmt = "csv" if out.endswith(".csv") else "parquet" if out.endswith(".parquet") else None
    if fmt is None:
        raise ValueError(f"--out must end in .parquet or .csv, not {out!r}")
    columns, rows = export_rows(open_passport_store(passports).list_by_job(job_id))
    if not rows:
        return 0
    storage.write_bytes(
        out, to_bytes(columns, rows, fmt), "text/csv" if fmt == "csv" else "application/vnd.apache.parquet"
    )
    return len(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="the job id")
    p.add_argument("--passports", required=True, help="dynamodb://TABLE or sqlite:///PATH")
    p.add_argument("--out", required=True, help="FILE.parquet or FILE.csv (local or s3://)")


def run(args: argparse.Namespace) -> int:
    from ray_app.core.errors import RayAppError

    try:
        n = export_job(args.job, args.passports, args.out)
    except (RayAppError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if n == 0:
        print(f"error: no passports of job {args.job!r} in {args.passports}", file=sys.stderr)
        return 1
    print(f"{n} scans of job {args.job} -> {args.out}")
    return 0
