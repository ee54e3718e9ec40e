"""Planning a batch job on Ray Data, so that the driver holds counts and block references, never per-scan rows.

manifest → read task (parse and validate, :mod:`ray_app.storage.manifest`) → resume stage (batched passport store
lookups) → the plan: one row per manifest row, ``run``, ``skipped`` or ``rejected``. Summary rows are written as
Parquet parts under the job's ``summary.parquet/`` while they stream; each part answers with its counts, which
are all the driver keeps (progress, the final report, the exit code).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ray_app.adapters.batch import worker_store
from ray_app.core.errors import RayAppError, StorageError
from ray_app.storage.manifest import ManifestProblem, check_records, parse_manifest, unreadable_manifest
from ray_app.storage.sinks import write_summary

RUN, SKIPPED, REJECTED = "run", "skipped", "rejected"
PLAN_SCHEMA = pa.schema(
    [
        pa.field("scan_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("error", pa.string()),
    ]
)
#: Plan rows per block out of the read: about 1 MB, so a million-row manifest is a few hundred blocks.
ROWS_PER_READ_BLOCK = 10_000
#: Scans per resume-stage call: ten DynamoDB ``BatchGetItem`` requests, or one SQLite statement.
LOOKUP_BATCH = 1_000
#: At most this many scans share a block of the run; fewer when the cluster's CPUs need more blocks to stay busy.
MAX_SCANS_PER_BLOCK = 256
#: The summary of a job comes in about this many parts (more for a small job: at least one row each).
SUMMARY_PARTS = 100
#: Seconds between progress lines.
PROGRESS_EVERY_S = 10.0
#: What each summary part counts: the report's figures and the exit code are sums of these.
COUNTS = ("rows", "ok", "failed", "rejected", "skipped", "earlier_failed")


class ManifestDatasource(Datasource):
    """One read task per manifest file, on a worker: it parses and validates the rows in order (a duplicate is
    known only from the rows before it) and yields blocks of :data:`ROWS_PER_READ_BLOCK` plan rows. ``limit``
    keeps the first runnable rows only, as ``--limit`` promises; rejected rows are all reported."""

    def __init__(self, uri: str, limit: int | None = None):
        super().__init__()
        self.uri, self.limit = uri, limit

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        uri, limit = self.uri, self.limit
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(uri,))
        return [ReadTask(lambda: _plan_blocks(uri, limit), meta, schema=PLAN_SCHEMA)]


def _plan_blocks(uri: str, limit: int | None) -> Iterator[pa.Table]:
    _, records = parse_manifest(uri)
    rows: list[dict[str, Any]] = []
    runnable = 0
    for item in check_records(records):
        if isinstance(item, ManifestProblem):
            rows.append(_rejected(item))
        elif limit is None or runnable < limit:
            runnable += 1
            rows.append({"scan_id": item["scan_id"], "uri": item["uri"], "status": RUN})
        if len(rows) >= ROWS_PER_READ_BLOCK:
            yield pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def _rejected(problem: ManifestProblem) -> dict[str, Any]:
    """A manifest row that cannot run is in the summary only: its id may be unusable as a key, or be the
    duplicate of a row that does run."""
    return {
        "scan_id": str(problem.scan_id or f"row {problem.row}"),
        "status": REJECTED,
        "error_code": problem.code,
        "error": f"manifest row {problem.row}: {problem.message}",
    }


def read_plan(manifest_uri: str, limit: int | None = None):
    """The validated manifest as a materialized dataset (in the object store, not the driver); a manifest
    unusable as a whole raises its :class:`ManifestError` here, before anything runs. Its format and existence are
    the caller's cheap check, before Ray starts (``check_manifest_exists``)."""
    import ray

    try:
        return _materialize(ray.data.read_datasource(ManifestDatasource(manifest_uri, limit), override_num_blocks=1))
    except StorageError as exc:  # gone since the check, not readable with these credentials, or too large
        raise unreadable_manifest(manifest_uri, exc) from exc


def resume(plan, store_uri: str, model_key: str, retry_failed: bool):
    """The resume rule as a stage of batched store lookups: a scan with a stored result for this model is
    skipped (a failed one too, unless ``retry_failed``), with the earlier failure's code in its summary row."""
    ds = plan.map_batches(
        _resume_batch,
        fn_kwargs={"store_uri": store_uri, "model_key": model_key, "retry_failed": retry_failed},
        batch_size=LOOKUP_BATCH,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    return _materialize(ds)


def _resume_batch(batch: pa.Table, store_uri: str, model_key: str, retry_failed: bool) -> pa.Table:
    ids, status = batch["scan_id"].to_pylist(), batch["status"].to_pylist()
    stored = worker_store(store_uri).statuses([s for s, st in zip(ids, status) if st == RUN], model_key)
    codes, errors = batch["error_code"].to_pylist(), batch["error"].to_pylist()
    for i, scan_id in enumerate(ids):
        found = stored.get(scan_id) if status[i] == RUN else None
        if found is None or (found[0] != "ok" and retry_failed):
            continue
        status[i] = SKIPPED
        if found[0] != "ok":
            codes[i], errors[i] = found[1] or "failed", "failed in an earlier run; not retried"
    columns = {"scan_id": ids, "uri": batch["uri"], "status": status, "error_code": codes, "error": errors}
    return pa.table(columns, schema=PLAN_SCHEMA)


def _materialize(ds):
    """``ds.materialize()``, re-raising a task's own :class:`RayAppError` (an unusable manifest, an unreachable
    store) as itself, so that the CLI answers it as before instead of with Ray's wrapper."""
    try:
        return ds.materialize()
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None:
            original = getattr(cause, "cause", None)  # a RayTaskError's original exception
            if isinstance(original, RayAppError):
                raise original from exc
            if isinstance(cause, RayAppError):
                raise cause from exc
            cause = cause.__cause__
        raise


def status_counts(plan) -> Counter:
    """How many plan rows have each status (an aggregate per block, summed here)."""
    counts: Counter = Counter()
    counted = plan.map_batches(_count_batch, batch_format="pyarrow", batch_size=ROWS_PER_READ_BLOCK)
    for row in counted.iter_rows():
        counts[row["status"]] += row["n"]
    return counts


def _count_batch(batch: pa.Table) -> pa.Table:
    counted = pc.value_counts(batch["status"]).to_pylist()
    return pa.table({"status": [c["values"] for c in counted], "n": [c["counts"] for c in counted]})


def run_blocks(scans: int, cpus: float) -> int:
    """Blocks for ``scans`` to run: four per CPU so every stage has work, but no more than
    :data:`MAX_SCANS_PER_BLOCK` scans share one (a lost block loses its scans) and never a block per scan of a
    large job (each block costs the driver a reference and a task per stage). Scans themselves are split into
    blocks by measured bytes after the fetch (Ray Data's ``target_max_block_size``)."""
    return max(1, min(scans, max(int(4 * cpus), math.ceil(scans / MAX_SCANS_PER_BLOCK))))


def runnable(plan, blocks: int, max_errored_blocks: int):
    """The scans to run (``scan_id``, ``uri``) in ``blocks`` blocks, as a dataset made under
    ``max_errored_blocks`` (datasets copy the context when made): a block Ray gives up on is recorded by the
    caller as lost scans instead of failing the job."""
    import ray

    refs = (
        plan.map_batches(_only_runnable, batch_format="pyarrow", batch_size=None)
        .repartition(blocks)
        .materialize()
        .to_arrow_refs()
    )
    context = ray.data.DataContext.get_current()
    saved = context.max_errored_blocks
    context.max_errored_blocks = max_errored_blocks
    try:
        return ray.data.from_arrow_refs(refs)
    finally:
        context.max_errored_blocks = saved


def _only_runnable(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["status"], RUN)).select(["scan_id", "uri"])


def not_run_summary(plan, job_id: str, model_key: str):
    """The summary rows of skipped and rejected manifest rows."""
    return plan.map_batches(
        _not_run_rows,
        fn_kwargs={"job_id": job_id, "model_key": model_key},
        batch_format="pyarrow",
        batch_size=ROWS_PER_READ_BLOCK,
    )


def _not_run_rows(batch: pa.Table, job_id: str, model_key: str) -> pa.Table:
    batch = batch.filter(pc.not_equal(batch["status"], RUN))
    n = batch.num_rows
    return pa.table(
        {
            "job_id": pa.array([job_id] * n, pa.string()),
            "scan_id": batch["scan_id"],
            "model_key": pa.array([model_key] * n, pa.string()),
            "status": batch["status"],
            "error_code": batch["error_code"],
            "error": batch["error"],
        }
    )


def rows_per_part(rows: int) -> int:
    """Summary rows per part: about :data:`SUMMARY_PARTS` parts a job, each also a step of progress."""
    return max(1, math.ceil(rows / SUMMARY_PARTS))


def write_summary_parts(ds, summary_uri: str, kind: str, rows: int):
    """A stage that writes each batch of summary rows as one part under ``summary_uri/`` and answers with the
    part's counts (:data:`COUNTS`). A part is named by its scans, so a retried task rewrites the same part.

    Its tasks reserve no CPU: a part is a few KB of rows. Any reservation would not fit beside an actor that
    takes all of a node but the CPU stages' share (1.8 of 2 CPUs), so parts and progress would wait for the
    actors to end; and Ray Data hands an operator no budget from a fractional remainder of CPUs, so even 0.1
    here left the finishing stage (passports, masks) starved until the last scan was segmented."""
    return ds.map_batches(
        _write_part,
        fn_kwargs={"summary_uri": summary_uri, "kind": kind},
        batch_size=rows_per_part(rows),
        batch_format="pyarrow",
        num_cpus=0,
    )


def _write_part(batch: pa.Table, summary_uri: str, kind: str) -> pa.Table:
    rows = batch.to_pylist()
    if rows:
        digest = hashlib.sha256("\n".join(sorted(r["scan_id"] for r in rows)).encode()).hexdigest()[:24]
        write_summary(rows, f"{summary_uri.rstrip('/')}/{kind}-{digest}.parquet")
    return pa.table({k: [v] for k, v in part_counts(rows).items()})


def part_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The :data:`COUNTS` of some summary rows (``failed`` counts rejected rows too, as the exit code does)."""
    status = Counter(r["status"] for r in rows)
    earlier = sum(1 for r in rows if r["status"] == SKIPPED and r.get("error_code"))
    return {
        "rows": len(rows),
        "ok": status["ok"],
        "failed": len(rows) - status["ok"] - status[SKIPPED],
        "rejected": status[REJECTED],
        "skipped": status[SKIPPED],
        "earlier_failed": earlier,
    }


def collect_counts(parts, progress: Callable[[Counter], None] | None = None) -> Counter:
    """Sum the counts the part writers answer with, as they stream; ``progress`` sees the running totals."""
    total: Counter = Counter()
    for row in parts.iter_rows():
        total.update({k: row[k] for k in COUNTS})
        if progress:
            progress(total)
    return total


class Progress:
    """Scans done, failed and skipped, with an ETA from the rate so far, every :data:`PROGRESS_EVERY_S` (stderr:
    stdout is the report's)."""

    def __init__(self, planned: int, skipped: int, stream=None):
        self.planned, self.skipped, self.stream = planned, skipped, stream or sys.stderr
        self.start = self.last = time.monotonic()

    def __call__(self, total: Counter) -> None:
        now = time.monotonic()
        done = total["rows"]
        if now - self.last < PROGRESS_EVERY_S and done < self.planned:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = f", about {(self.planned - done) / rate:.0f} s left" if rate and done < self.planned else ""
        speed = f"{rate:.1f} scans/s" if rate >= 1 else f"{rate * 60:.1f} scans/min"
        print(
            f"progress: {done:,} of {self.planned:,} scans ({total['ok']:,} ok, {total['failed']:,} failed), "
            f"{self.skipped:,} skipped; {speed}{eta}",
            file=self.stream,
            flush=True,
        )
