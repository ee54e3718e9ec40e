"""The batch job on Ray Data: manifest → fetch and decode (CPU tasks) → segment (autoscaling actor pool) →
write (CPU tasks) → job summary.

Streaming end to end: scans flow through the three stages a few at a time, so memory stays bounded whatever
the manifest's length, and inference actors never wait on S3 or gzip. Each stage turns a scan's failure into a
failure record instead of an exception, so one bad scan never stops (or retries) the job.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property, lru_cache
from typing import Any

from ray_app import storage
from ray_app.core import pipeline
from ray_app.core.errors import PreflightError, RayAppError, WorkerLost
from ray_app.core.totalseg import TaskSpec, missing_weights, task_spec
from ray_app.settings import Settings, get_settings
from ray_app.storage import results
from ray_app.storage.keys import job_file_uri
from ray_app.storage.sinks import (
    ArtifactSink,
    PassportStore,
    clear_summary,
    open_passport_store,
    read_summary,
    read_summary_table,
    summary_parts,
    write_summary,
)

#: The key a preflight reads from the passport store: it proves the store exists and answers, and is never written.
PREFLIGHT_SCAN_ID = "_preflight"


@dataclass
class BatchConfig:
    manifest: str
    output: str
    passports: str | None = None
    job_id: str = field(
        default_factory=lambda: time.strftime("job-%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:6]
    )
    fast: bool = True
    device: str = "cpu"
    roi_subset: tuple[str, ...] | None = None
    force: bool = False
    retry_failed: bool = False
    preview: bool = False
    #: Also write ``segmentations.zip`` (one NIfTI per structure, TotalSegmentator's default layout) per scan.
    per_structure: bool = False
    min_actors: int = 1
    max_actors: int = 2
    cpus_per_actor: float = 1.0
    #: GPUs Ray reserves per segmentation actor; ``None``: one with ``device="cuda"``, none with ``"cpu"``.
    gpus_per_actor: float | None = None
    actor_resources: dict[str, float] | None = None
    #: Bytes per segmentation actor: reserved with Ray's scheduler and enforced as the actor's heap limit.
    memory_per_actor: int | None = None
    #: Times a scan is segmented again after the actor segmenting it died (a Spot loss, the OOM killer, a native
    #: crash). Bounded, so a scan that kills its worker every time fails as ``worker_lost`` and the job ends.
    max_task_retries: int = 3
    #: Run only the first ``limit`` runnable manifest rows: a pilot whose measured figures price the whole month.
    limit: int | None = None

    def __post_init__(self):
        """Coupled options, checked once before anything starts: an actor on ``cuda`` that Ray gave no GPU sees
        none and fails at construction, each one; a GPU reserved for a ``cpu`` actor idles."""
        if self.gpus_per_actor is None:
            self.gpus_per_actor = 1.0 if self.device == "cuda" else 0.0
        if self.device == "cuda" and self.gpus_per_actor <= 0:
            raise ValueError(
                "--device cuda needs a GPU per actor: leave --gpus-per-actor out (default 1 with cuda) "
                "or give a share such as 0.5"
            )
        if self.device != "cuda" and self.gpus_per_actor > 0:
            raise ValueError(
                f"--gpus-per-actor {self.gpus_per_actor:g} reserves GPUs that --device "
                f"{self.device} actors never use: add --device cuda (or RAY_APP_DEVICE=cuda)"
            )

    @property
    def passport_store_uri(self) -> str:
        """Default store: DynamoDB must be named for S3 output; local output gets an embedded SQLite file."""
        if self.passports:
            return self.passports
        if storage.is_s3(self.output):
            raise RayAppError("an s3:// output needs --passports dynamodb://TABLE (or sqlite:///PATH)")
        return f"sqlite:///{os.path.abspath(os.path.join(self.output, 'passports.sqlite'))}"

    def job_uri(self, name: str) -> str:
        """A file of this job's own folder, ``OUTPUT/_jobs/<job_id>/``."""
        return job_file_uri(self.output, self.job_id, name)

    @property
    def summary_uri(self) -> str:
        return self.job_uri("summary.parquet")


@dataclass
class BatchReport:
    """A finished job as counts (summed from the summary parts as they were written) and where its summary is;
    the per-scan rows stay in the summary, read back only when asked for."""

    job_id: str
    summary_uri: str
    #: :data:`ray_app.adapters.plan.COUNTS`: rows, ok, failed (rejected included), rejected, skipped, earlier_failed.
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def succeeded(self) -> int:
        return self.counts.get("ok", 0)

    @property
    def exit_code(self) -> int:
        """0 when every scan of the manifest has a good result, from this run or an earlier one; 1 when any failed
        here, was rejected, or was skipped because an earlier run failed it."""
        return 1 if self.failed or self.counts.get("earlier_failed", 0) else 0

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        """Every summary row, read back from the summary: for small jobs and tests; large ones read the Parquet."""
        return read_summary(self.summary_uri)

    @property
    def skipped(self) -> list[str]:
        return [r["scan_id"] for r in self.rows if r["status"] == "skipped"]

    @property
    def earlier_failures(self) -> dict[str, str]:
        """Skipped scans whose stored result is an earlier run's failure (scan id -> error code): not redone
        without ``retry_failed``, and still failed."""
        return {r["scan_id"]: r["error_code"] for r in self.rows if r["status"] == "skipped" and r["error_code"]}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS`` (e.g. under ``ray job submit``), or start a local
    one that listens on loopback only (the laptop default)."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The local cluster's workers inherit this process's environment (weights path, AWS endpoint and credentials,
    # settings). Nothing goes into a runtime_env: Ray writes those into its logs.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


def preflight(
    cfg: BatchConfig, store: PassportStore, spec: TaskSpec, settings: Settings, *, weights: bool = True
) -> None:
    """Prove the job's destinations before any scan runs: the store answers, the output takes a write (the job's
    record, ``_jobs/<job>/job.json``, with the credentials the job writes with), and (``weights``) the weights are
    where the segmenter looks when it may not download them. A mistake costs seconds, not a job of failures."""
    region, source = storage.aws_region()
    try:
        store.status(PREFLIGHT_SCAN_ID, spec.key)
    except storage.StorageError as exc:
        raise PreflightError(
            f"passport store {cfg.passport_store_uri} is not usable: {exc.message} (AWS region {region}, from {source})"
        ) from exc
    record = {
        "job_id": cfg.job_id,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "manifest": cfg.manifest,
        "model_key": spec.key,
        "device": cfg.device,
        "limit": cfg.limit,
        "region": region,
    }
    try:
        storage.write_bytes(cfg.job_uri("job.json"), json.dumps(record, indent=1).encode(), "application/json")
    except storage.StorageError as exc:
        raise PreflightError(
            f"cannot write under {cfg.output}: {exc.message}. On AWS the nodes' role may write "
            "only under the prefix jobs/setup_aws.py --output was given"
        ) from exc
    missing = [] if settings.download_weights or not weights else missing_weights(spec)
    if missing:
        raise PreflightError(
            f"model weights {', '.join(missing)} are not in TotalSegmentator's weights folder and "
            "downloads are off (RAY_APP_DOWNLOAD_WEIGHTS=false)"
        )


def _fetch(row: dict[str, Any]) -> dict[str, Any]:
    """Download, decode and validate one scan (CPU task)."""
    from ray_app.storage.scans import load_scan

    t = time.perf_counter()
    try:
        scan = load_scan(row["uri"], row["scan_id"], get_settings())
        blob, code, message = pickle.dumps(scan, protocol=5), "", ""
    except Exception as exc:  # noqa: BLE001 - recorded as the scan's failure
        code, message = pipeline.error_fields(exc)
        blob = b""
    return {
        "scan_id": row["scan_id"],
        "uri": row["uri"],
        "scan": blob,
        "error_code": code,
        "error_message": message,
        "read_s": time.perf_counter() - t,
    }


class _Starts:
    """How many times a segmentation actor has begun each scan in this job. A Ray actor on the driver's node, so
    the count outlives the segmentation actors and the worker nodes they die with."""

    def __init__(self):
        self.starts: dict[str, int] = {}

    def begin(self, scan_id: str) -> int:
        """Record one more start of ``scan_id``; returns how many came before (each one a worker that died)."""
        before = self.starts.get(scan_id, 0)
        self.starts[scan_id] = before + 1
        return before


def _worker_lost(scan_id: str, deaths: int) -> WorkerLost:
    return WorkerLost(
        f"the worker segmenting this scan died {deaths} time{'s' if deaths != 1 else ''} (node loss, "
        "out of memory or a crash); not tried again",
        scan_id=scan_id,
    )


class SegmentActor:
    """Loads the segmenter once per actor (Ray's batch-inference pattern) and segments one scan per call.

    A scan whose actor dies under it (Spot loss, OOM killer, native crash) comes back to a restarted actor: Ray
    Data re-delivers it for as long as it takes. ``starts`` counts the times a scan was begun, so that after
    ``max_task_retries`` deaths the next delivery answers with a ``worker_lost`` failure record instead of
    segmenting it again: a scan that kills its worker every time cannot hang the job.
    """

    def __init__(
        self,
        fast: bool,
        device: str,
        roi_subset: tuple[str, ...] | None,
        num_threads: int,
        memory_limit: int | None = None,
        starts=None,
        max_task_retries: int = 3,
        cpus: float | None = None,
        gpus: float = 0.0,
    ):
        from ray_app.core.segmenter import Segmenter

        if memory_limit:
            _limit_memory(memory_limit)
        self.starts = starts
        self.max_task_retries = max_task_retries

        self.segmenter = Segmenter(
            fast=fast, device=device, roi_subset=list(roi_subset) if roi_subset else None, num_threads=num_threads
        )
        # Recorded with every scan (summary columns actor_cpus, actor_gpus, node_cpus): the cost report turns
        # seconds into CPU- and GPU-seconds with them, so a run measured with one actor size projects onto
        # another. node_cpus: the CPUs this process may run on (the machine's, or its cgroup cpuset's), not
        # the count Ray was told, which a laptop may set higher than its cores.
        self.usage = {
            "actor_cpus": float(cpus if cpus is not None else num_threads),
            "actor_gpus": float(gpus),
            "node_cpus": _machine_cpus(),
        }

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"scan_id": [], "result": []}
        for i, scan_id in enumerate(batch["scan_id"]):
            timings = {"read_s": float(batch["read_s"][i])}
            blob = None
            if batch["error_code"][i]:
                exc = RayAppError(str(batch["error_message"][i]), scan_id=scan_id)
                exc.code = str(batch["error_code"][i])
                result = pipeline.failure(
                    scan_id, exc, self.segmenter.model_info, source_uri=batch["uri"][i], timings=timings
                )
            elif (deaths := self._deaths_before(scan_id)) > self.max_task_retries:
                result = pipeline.failure(
                    scan_id,
                    _worker_lost(scan_id, deaths),
                    self.segmenter.model_info,
                    source_uri=batch["uri"][i],
                    timings=timings,
                )
            else:
                try:
                    result = pipeline.segment_scan(self.segmenter, pickle.loads(batch["scan"][i]), timings=timings)
                    result.usage.update(self.usage)
                    blob = pickle.dumps(result, protocol=5)
                except Exception as exc:  # noqa: BLE001 - e.g. MemoryError unpickling a huge scan: its failure only
                    result = blob = None  # let a partial result go before the failure record is made
                    result = pipeline.failure(
                        scan_id, exc, self.segmenter.model_info, source_uri=batch["uri"][i], timings=timings
                    )
            result.usage.update(self.usage)
            out["scan_id"].append(scan_id)
            out["result"].append(blob or pickle.dumps(result, protocol=5))
        return out

    def _deaths_before(self, scan_id: str) -> int:
        """Record this start of the scan; returns the earlier ones (0 without a counter, or when it cannot be
        reached: then the scan is segmented as usual)."""
        if self.starts is None:
            return 0
        import ray

        try:
            return int(ray.get(self.starts.begin.remote(scan_id), timeout=60))
        except Exception:  # noqa: BLE001 - counting is a safeguard; the scan still runs
            traceback.print_exc()
            return 0


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _limit_memory(limit: int) -> None:
    """Cap this process's heap and anonymous memory (``RLIMIT_DATA``) so that a scan needing more than the actor's
    share fails here with ``MemoryError``, recorded as ``out_of_memory`` while the actor goes on, instead of the
    kernel's OOM killer taking the worker and Ray retrying the same scan on a fresh actor without end."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


@lru_cache(maxsize=4)
def _store(uri: str):
    return open_passport_store(uri)


def _make_writer(
    output: str, store_uri: str, job_id: str, preview: bool, label_map: dict[int, str], per_structure: bool = False
):
    def _write(row: dict[str, Any]) -> dict[str, Any]:
        """Write one scan's files and passport (CPU task); returns its summary row."""
        result: pipeline.ScanResult = pickle.loads(row["result"])
        start = time.perf_counter()
        try:
            results.write_result(
                result,
                ArtifactSink(output),
                _store(store_uri),
                job_id,
                label_map=label_map,
                preview=preview,
                per_structure=per_structure,
            )
        except Exception as exc:  # noqa: BLE001 - a write failure is this scan's failure
            failed = pipeline.failure(
                result.scan_id,
                exc,
                result.passport["model"],
                source_uri=(result.passport.get("scan") or {}).get("source_uri"),
                timings=result.passport.get("timings"),
            )
            try:
                _store(store_uri).put(failed.passport, job_id)
            except Exception:  # noqa: BLE001 - the summary row still records it
                pass
            result = failed
        timings = result.passport.setdefault("timings", {})
        timings["total_s"] = sum(v for k, v in timings.items() if k in ("read_s", "segment_s", "passport_s")) + (
            time.perf_counter() - start
        )
        row = results.summary_row(result.passport, job_id, result.locations, result.usage)
        try:
            from ray_app.adapters.metrics import record_scan

            record_scan(row)  # Ray's metrics endpoint: scans by status and code, seconds per stage
        except Exception:  # noqa: BLE001 - metrics never fail a scan
            pass
        return row

    return _write


def run_batch(cfg: BatchConfig, settings: Settings | None = None) -> BatchReport:
    """Run the whole job, writing its summary in parts as scans finish; returns the job's counts."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_app.adapters import plan

    settings = settings or get_settings()
    spec = task_spec("total", fast=cfg.fast, roi_subset=cfg.roi_subset)
    store_uri = cfg.passport_store_uri
    store = open_passport_store(store_uri)
    init_ray()
    planned = plan.read_plan(cfg.manifest, cfg.limit)
    preflight(cfg, store, spec, settings)
    clear_summary(cfg.summary_uri)
    if not cfg.force:
        planned = plan.resume(planned, store_uri, spec.key, cfg.retry_failed)
    statuses = plan.status_counts(planned)
    todo = statuses[plan.RUN]
    not_run = plan.not_run_summary(planned, cfg.job_id, spec.key)
    counts = plan.collect_counts(plan.write_summary_parts(not_run, cfg.summary_uri, "plan", statuses.total()))

    if todo:
        threads = max(1, int(cfg.cpus_per_actor))
        starts = (
            ray.remote(_Starts)
            .options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
            )
            .remote()
        )
        # Every stage turns a scan's own failure into a record, so a block errors only when Ray gives up on it (a
        # task's worker lost more often than Ray retries it, an object lost with its node): the job goes on
        # without it and records its scans below instead of failing as a whole.
        blocks = plan.run_blocks(todo, ray.cluster_resources().get("CPU", 1.0))
        ds = plan.runnable(planned, blocks, max_errored_blocks=blocks)
        ds = ds.map(_fetch, num_cpus=0.5)
        ds = ds.map_batches(
            SegmentActor,
            fn_constructor_kwargs={
                "fast": cfg.fast,
                "device": cfg.device,
                "roi_subset": cfg.roi_subset,
                "num_threads": threads,
                "memory_limit": cfg.memory_per_actor,
                "starts": starts,
                "max_task_retries": cfg.max_task_retries,
                "cpus": cfg.cpus_per_actor,
                "gpus": cfg.gpus_per_actor,
            },
            batch_size=1,
            compute=ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
            resources=cfg.actor_resources,
            batch_format="default",
            # Ray Data's pool keeps max_restarts=-1 and max_task_retries=-1: the bound on a scan that kills its
            # actor is SegmentActor's count of starts, not Ray's max_task_retries. Ray counts every failed
            # delivery, and while a lost node is not yet declared dead each one fails within seconds
            # (ActorUnavailableError): max_task_retries=3 (passed as a ray_remote_arg, deprecated in 2.60 with no
            # named parameter) failed 5 of 6 scans as lost after one node kill in tests/test_reliability.py.
            **({"memory": cfg.memory_per_actor} if cfg.memory_per_actor else {}),
        )
        ds = ds.map(
            _make_writer(cfg.output, store_uri, cfg.job_id, cfg.preview, spec.output_labels, cfg.per_structure),
            num_cpus=0.5,
        )
        progress = plan.Progress(todo, statuses[plan.SKIPPED])
        try:
            counts += plan.collect_counts(plan.write_summary_parts(ds, cfg.summary_uri, "run", todo), progress)
        finally:
            ray.kill(starts)
        if counts["rows"] < statuses.total():
            counts = _record_lost(planned, cfg, store, spec)
    if not counts["rows"]:  # an empty manifest still has a summary, with no rows
        write_summary([], f"{cfg.summary_uri}/plan-empty.parquet")
    return BatchReport(cfg.job_id, cfg.summary_uri, dict(counts))


def _record_lost(planned, cfg: BatchConfig, store, spec) -> Counter:
    """Record the scans that were to run but have no summary row (Ray gave up on their block), and return the
    job's counts read back from its summary. Only on this rare path does the driver hold scan ids: those of
    this run's summary parts."""
    from ray_app.adapters import plan

    parts = [p for p in summary_parts(cfg.summary_uri) if p.rsplit("/", 1)[-1].startswith("run-")]
    seen = {sid for p in parts for sid in read_summary_table(p, columns=["scan_id"])["scan_id"].to_pylist()}
    lost = [
        _worker_lost_row(item, cfg, store, spec)
        for batch in plan.runnable(planned, 1, 0).iter_batches(batch_format="pyarrow", batch_size=plan.LOOKUP_BATCH)
        for item in batch.to_pylist()
        if item["scan_id"] not in seen
    ]
    if lost:
        write_summary(lost, f"{cfg.summary_uri}/lost-{uuid.uuid4().hex[:12]}.parquet")
    return Counter(plan.part_counts(read_summary_table(cfg.summary_uri, columns=["status", "error_code"]).to_pylist()))


def _worker_lost_row(item: dict[str, Any], cfg: BatchConfig, store, spec) -> dict[str, Any]:
    """The failure record of a scan that produced no row because Ray gave up on its block. Written like any
    failure (passport.json, then the store entry) so that a re-run skips it unless ``retry_failed``."""
    exc = WorkerLost(
        "no result came back for this scan: Ray gave up on it after losing its worker (node loss, "
        "out of memory or a crash)",
        scan_id=item["scan_id"],
    )
    model = {
        "key": spec.key,
        "task": spec.task,
        "mode": spec.mode,
        "device": cfg.device,
        "roi_subset": list(spec.roi_subset) if spec.roi_subset else None,
    }
    result = pipeline.failure(item["scan_id"], exc, model, source_uri=item["uri"])
    try:
        results.write_result(result, ArtifactSink(cfg.output), store, cfg.job_id, label_map=spec.output_labels)
    except Exception:  # noqa: BLE001 - the summary row still records it
        traceback.print_exc()
    return results.summary_row(result.passport, cfg.job_id, result.locations, result.usage)


#: Scan lines in the final table; the rest are in the summary.
REPORT_LINES = 50
_REPORT_COLUMNS = ["scan_id", "status", "error_code", "error", "total_s", "structures_present", "liver_ml"]


def format_report(report: BatchReport) -> str:
    """The final table a user reads: a line per scan (failures first, at most :data:`REPORT_LINES`; skipped
    scans only with an earlier failure), then the counts."""
    import pyarrow.compute as pc

    lines = [f"{'scan_id':<28} {'status':<9} {'seconds':>8}  detail"]
    table = read_summary_table(report.summary_uri, columns=_REPORT_COLUMNS)
    shown = table.filter(pc.or_(pc.not_equal(table["status"], "skipped"), pc.is_valid(table["error_code"])))
    for r in sorted(shown.to_pylist(), key=lambda r: (r["status"] == "ok", r["scan_id"]))[:REPORT_LINES]:
        seconds = r.get("total_s")
        detail = r.get("error_code") or ""
        if r.get("error"):
            detail += f": {r['error']}"
        if r["status"] == "ok":
            detail = f"{r.get('structures_present')} structures, liver {_ml(r.get('liver_ml'))}"
        lines.append(
            f"{r['scan_id'][:28]:<28} {r['status']:<9} {'' if seconds is None else f'{seconds:8.1f}':>8}"
            f"  {detail[:120]}"
        )
    if shown.num_rows > REPORT_LINES:
        lines.append(f"... and {shown.num_rows - REPORT_LINES:,} more scans in the summary")
    c = report.counts
    earlier = (
        f", {c['earlier_failed']} of them failed earlier (--retry-failed redoes those)"
        if c.get("earlier_failed")
        else ""
    )
    lines.append(
        f"job {report.job_id}: {report.succeeded} ok, {report.failed} failed, "
        f"{c.get('skipped', 0)} skipped (already done{earlier}); summary: {report.summary_uri}"
    )
    return "\n".join(lines)


def _ml(value) -> str:
    return "-" if value is None else f"{value:.0f} ml"
