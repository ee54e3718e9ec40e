"""The batch job on Ray Data: manifest → fetch, decode, validate and prepare (CPU tasks) → inference only
(autoscaling actor pool, CPU or GPU) → finish, passport and write (CPU tasks) → job summary.

Streaming end to end: scans flow through the stages a few at a time, so memory stays bounded whatever the
manifest's length. The actors receive each scan's small model-grid array (``core.stages``) and nothing else:
they never wait on S3, gzip, resampling or the passport, and the full-resolution scan crosses the object store
once, from the task that decoded it to the one that finishes it. Each stage turns a scan's failure into a
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
from typing import TYPE_CHECKING, Any, cast

from ray_app import storage
from ray_app.core import pipeline, stages
from ray_app.core.errors import (
    ManifestError,
    PreflightError,
    RayAppError,
    WeightsMissing,
    WorkerLost,
    describe,
    from_code,
)
from ray_app.core.totalseg import TaskSpec, ensure_weights, missing_weights, task_spec
from ray_app.settings import Settings, get_settings
from ray_app.storage import results
from ray_app.storage.keys import job_file_uri
from ray_app.storage.manifest import check_manifest_exists
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

if TYPE_CHECKING:
    from ray.actor import ActorHandle

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
    #: Actor pool size and CPUs per actor; ``None``: sized to the cluster by :func:`plan_shape`.
    min_actors: int | None = None
    max_actors: int | None = None
    cpus_per_actor: float | None = None
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
        none and fails at construction, each one; a GPU reserved for a ``cpu`` actor idles; an S3 output has no
        local folder for the embedded passport store."""
        if not self.passports and self.output[:5].lower() == "s3://":  # the URI itself is checked where it is used
            raise ValueError(
                "an s3:// output needs a passport store: --table NAME (DynamoDB) or --passports sqlite:///PATH"
            )
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
        """The store named, or for a local output an embedded SQLite file beside the results."""
        if self.passports:
            return self.passports
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


def preflight(cfg: BatchConfig, spec: TaskSpec, settings: Settings, *, weights: bool = True) -> PassportStore:
    """Prove the job's destinations before any scan runs: the store opens and answers, (``weights``) the weights are
    where the segmenter looks, downloaded here once if they may be (not by every actor, each failing on its own),
    and the output takes a write (the job's record, ``_jobs/<job>/job.json``, with the credentials the job writes
    with). A mistake costs seconds, not a job of failures. Returns the opened store."""
    region, source = storage.aws_region()
    try:
        store = open_passport_store(cfg.passport_store_uri)
        store.status(PREFLIGHT_SCAN_ID, spec.key)
    except (storage.StorageError, storage.UnsupportedUri) as exc:
        raise PreflightError(
            f"passport store {cfg.passport_store_uri} is not usable: {exc.message} (AWS region {region}, from {source})"
        ) from exc
    missing = missing_weights(spec) if weights else []
    if missing and not settings.download_weights:
        raise PreflightError(
            f"model weights {', '.join(missing)} are not in TotalSegmentator's weights folder and "
            "downloads are off (RAY_APP_DOWNLOAD_WEIGHTS=false)"
        )
    for stage in spec.all_stages if missing else ():
        try:
            ensure_weights(stage)
        except WeightsMissing as exc:
            raise PreflightError(exc.message) from exc
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
    except (storage.StorageError, storage.UnsupportedUri) as exc:
        hint = ". On AWS the nodes' role may write only under the prefix jobs/setup_aws.py --output was given"
        raise PreflightError(
            f"cannot write under {cfg.output}: {exc.message}{hint if cfg.output.startswith('s3://') else ''}"
        ) from exc
    return store


#: Ray CPUs each CPU-stage task (prepare, ROI crop, finish) reserves. Their work is seconds of one core per scan
#: against the actor's tens, so a small token: what matters is that it always fits beside the actors.
TASK_CPUS = 0.1
#: CPUs a cluster keeps free of actors for the CPU stages: two tasks at once, so prepare and finish overlap.
STAGE_CPUS = 2 * TASK_CPUS
#: Actors an unflagged job starts per GPU. On CPU nodes an unflagged job starts one actor per node with as many
#: torch threads as the node has CPUs, vanilla TotalSegmentator's own count (``torch.set_num_threads(cpu_count())``):
#: a CPU forward's float sums depend on the thread count, so only then are the masks vanilla's, voxel for voxel.
#: Smaller actors (``--cpus-per-actor 1``: more of them, fewer threads each) are the opt-in throughput lever.
ACTORS_PER_GPU = 1


@dataclass(frozen=True)
class Shape:
    """The job's resource shape: the actor pool and what each actor reserves, and what each CPU-stage task does."""

    min_actors: int
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    #: CPU-stage tasks at once: the cores the actors leave (at least two), so on a GPU node the CPU stages use the
    #: node's CPUs while the actor uses the GPU; Ray Data's backpressure does the rest.
    task_concurrency: int = 2
    task_cpus: float = TASK_CPUS


def plan_shape(cfg: BatchConfig, cluster: dict[str, float], node_cpus: list[float] | None = None) -> Shape:
    """The shape for ``cfg`` on a cluster offering ``cluster`` (``ray.cluster_resources()``) on nodes of
    ``node_cpus`` CPUs (default: one node). Unset options follow the cluster; a shape the cluster can never run, or
    one whose actors leave the CPU stages no CPU (the job would wait forever), raises :class:`PreflightError`
    before anything starts. ``roi_subset`` runs two pools (its crop pass has its own), each sized to half, with
    the node's threads each. Actors pinned to a node type (``actor_resources``) run on nodes the autoscaler has
    yet to start, so they are not checked here: ``ray-app cluster run`` checks them against cluster.yaml's node
    types (:func:`stage_cpus_per_actor`). Pinned CPU actors run one CPU-stage task per two actors at once (a
    CPU node's room is what its actors leave; a task takes a few percent of an actor's seconds per scan, and half
    of the room stays a margin for the autoscaler's float arithmetic, which fits only 7 of 8 0.1-CPU tasks beside
    8 1.9-CPU actors); GPU actors two per stage (a GPU node's other CPUs are the stages')."""
    pools = 2 if cfg.roi_subset else 1
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0)) / pools
    nodes = [c for c in (node_cpus or [cpus]) if c >= 1] or [cpus]
    g = float(cfg.gpus_per_actor or 0.0)
    if cfg.actor_resources:
        a = cfg.cpus_per_actor or 1.0
        n_max = cfg.max_actors or 2
        per_stage = 2 * n_max if g else max(1, pools * n_max // (2 * (pools + 1)))  # prepare, (crop), finish
        return Shape(min(cfg.min_actors or 1, n_max), n_max, a, g, _threads(a), per_stage)
    room = (cpus - STAGE_CPUS) / pools  # CPUs for one pool's actors
    if cfg.device == "cuda":
        a = cfg.cpus_per_actor or 1.0
        auto = max(1, min(int(gpus // g) * ACTORS_PER_GPU, int((room + 1e-9) // a)))
        threads = _threads(a)
    elif cfg.cpus_per_actor:  # as many actors of that size as fit
        a = cfg.cpus_per_actor
        auto = max(1, int((room + 1e-9) // a))
        threads = _threads(a)
    else:  # one actor per node (and pool), as wide as the smallest node
        auto = len(nodes)
        a = max(min(nodes) - STAGE_CPUS, TASK_CPUS) / pools
        threads = max(1, int(min(nodes) + 1e-9))
    n_max = cfg.max_actors or auto
    n_min = cfg.min_actors or (n_max if cfg.max_actors is None else 1)
    if n_min > n_max:
        raise PreflightError(f"--min-actors {n_min} is more than --max-actors {n_max}")
    if n_min * a > room + 1e-9 or (g and n_min * g > gpus + 1e-9):
        have = f"{cpus:g} CPUs" + (f" and {gpus * pools:g} GPUs" if g else "")
        actors = f"{n_min} actor(s)" + (" per pool (roi_subset runs two)" if pools > 1 else "")
        raise PreflightError(
            f"{actors} x {a:g} CPUs{f' x {g:g} GPUs' if g else ''} do not fit this cluster ({have}) with "
            f"the {STAGE_CPUS:g} CPUs its CPU stages need (fetch, prepare, finish, write): the job would wait "
            f"forever. Use --cpus-per-actor {max(room, 0) / n_min:.2g} or less, fewer --min-actors, or leave "
            "them out to fit the cluster"
        )
    n_max = max(n_min, min(n_max, int((room + 1e-9) // a), int(gpus // g) if g else n_max))
    return Shape(n_min, n_max, a, g, threads, max(2, int(cpus - pools * n_max * a + 1e-9)))


def stage_cpus_per_actor(cfg: BatchConfig, shape: Shape) -> float:
    """CPUs the CPU-stage tasks hold per actor when all run at once: what each actor must leave free on its node,
    or the tasks wait for nodes of their own (or forever, once the cluster is at its size)."""
    pools = 2 if cfg.roi_subset else 1
    return (pools + 1) * shape.task_concurrency * shape.task_cpus / (pools * shape.max_actors)


def _threads(cpus_per_actor: float) -> int:
    """Torch threads for an actor of ``cpus_per_actor``: its whole CPUs, counting one short of a whole core by no
    more than the CPU stages' token reservation as that core (``--cpus-per-actor 1.8`` on 2 CPUs: 2 threads)."""
    return max(1, int(cpus_per_actor + STAGE_CPUS + 1e-9))


def _make_preparer(spec: TaskSpec, aside):
    def _prepare(row: dict[str, Any]) -> dict[str, Any]:
        """Download, decode, validate one scan and bring it to the model's grid (CPU task). Only the small
        model-grid array goes on to the actor; the scan itself (its CT, DICOM headers) waits in ``aside``."""
        from ray_app.storage.scans import load_scan

        out = {
            "scan_id": row["scan_id"],
            "uri": row["uri"],
            "prepared": b"",
            "aside": False,
            "error_code": "",
            "error_message": "",
        }
        timings = {}
        t = time.perf_counter()
        try:
            scan = load_scan(row["uri"], row["scan_id"], get_settings())
            timings["read_s"] = time.perf_counter() - t
            t = time.perf_counter()
            out["prepared"] = pickle.dumps(stages.first_pass(spec, scan.image), protocol=5)
            timings["resample_in_s"] = time.perf_counter() - t
            _put_aside(aside, scan)
            out["aside"] = True
        except Exception as exc:  # noqa: BLE001 - recorded as the scan's failure
            out["error_code"], out["error_message"] = _error_fields(exc)
            timings.setdefault("read_s", time.perf_counter() - t)
        out["timings"] = json.dumps(timings)
        return out

    return _prepare


class _Aside:
    """Each scan's full-resolution data (a reference to it, put once by the task that decoded it) while its
    model-grid copy is in the actor: the CT crosses the object store once and never reaches the actor. An actor
    on the driver's node holding only references, so the data is freed as soon as the last stage takes it."""

    def __init__(self):
        self.refs: dict[str, Any] = {}

    def hold(self, scan_id: str, refs: list) -> None:
        self.refs[scan_id] = refs[0]

    def get(self, scan_id: str, take: bool) -> list:
        return [self.refs.pop(scan_id, None) if take else self.refs.get(scan_id)]


def _put_aside(aside, scan) -> None:
    import ray

    ray.get(aside.hold.remote(scan.scan_id, [ray.put(scan)]))


def _error_fields(exc: BaseException) -> tuple[str, str]:
    """A failure's code and message as the stages pass them along (strings: rows cross Ray as Arrow)."""
    info = describe(exc)
    return info.code, info.message


def _scan_from_aside(aside, row: dict[str, Any], take: bool):
    """The scan put aside by its prepare task; read again from its source if that copy is gone (its node or
    the worker that put it lost, a retried task that had already taken it)."""
    import ray

    try:
        (ref,) = ray.get(aside.get.remote(row["scan_id"], take))
        if ref is not None:
            return ray.get(ref)
    except Exception:  # noqa: BLE001 - the source still has it
        traceback.print_exc()
    from ray_app.storage.scans import load_scan

    return load_scan(row["uri"], row["scan_id"], get_settings())


def _drop_aside(aside, scan_id: str) -> None:
    """Let a failed scan's full-resolution data go (its reference only: nothing is fetched)."""
    import ray

    try:
        ray.get(aside.get.remote(scan_id, True))
    except Exception:  # noqa: BLE001 - freed with the job's end anyway
        traceback.print_exc()


def _make_cropper(spec: TaskSpec, aside):
    def _crop(row: dict[str, Any]) -> dict[str, Any]:
        """``roi_subset`` between its two passes (CPU task): crop the scan to the ROIs the 6 mm pass found and
        prepare the main pass on the crop (an empty crop goes on as ``None``)."""
        if row["error_code"]:
            return row
        t = time.perf_counter()
        try:
            rough, labels = pickle.loads(row["prepared"])
            scan = _scan_from_aside(aside, row, take=False)
            row["prepared"] = pickle.dumps(stages.crop_for_roi(spec, scan.image, rough, labels), protocol=5)
        except Exception as exc:  # noqa: BLE001 - recorded as the scan's failure
            row["error_code"], row["error_message"] = _error_fields(exc)
        row["timings"] = json.dumps({**json.loads(row["timings"]), "roi_crop_s": time.perf_counter() - t})
        return row

    return _crop


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
    """Loads the segmenter once per actor (Ray's batch-inference pattern) and runs only its inference stage, on one
    scan's model-grid array per call.

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
        gpus: float = 0.0,
    ):
        from ray_app.core.segmenter import Segmenter

        if memory_limit:
            _limit_memory(memory_limit)
        self.starts = starts
        self.max_task_retries = max_task_retries

        # The worker's own settings (its environment, as the driver's), passed explicitly.
        self.segmenter = Segmenter.from_settings(
            get_settings(), task_spec("total", fast=fast, roi_subset=roi_subset), device=device, num_threads=num_threads
        )
        # Recorded with every scan (summary columns actor_cpus, actor_gpus, node_cpus): the cost report turns
        # seconds into CPU- and GPU-seconds with them, so a run measured with one actor size projects onto
        # another. actor_cpus: the cores its torch threads keep busy, not its Ray reservation (a 1.8-CPU actor
        # runs 2 threads: counted as 1.8 it under-priced its CPU-seconds by a tenth). node_cpus: the CPUs this
        # process may run on (the machine's, or its cgroup cpuset's), not the count Ray was told, which a laptop
        # may set higher than its cores.
        self.usage = {
            "actor_cpus": float(num_threads),
            "actor_gpus": float(gpus),
            "node_cpus": _machine_cpus(),
        }
        self.model_json = json.dumps(self.segmenter.model_info)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Infer each row's model-grid array: its labels (on the same grid) replace it in the row."""
        out: dict[str, list] = {key: list(values) for key, values in batch.items()}
        out.update(model=[], usage=[])
        for i, scan_id in enumerate(batch["scan_id"]):
            if not batch["error_code"][i]:
                self._infer_row(out, i, scan_id)
            out["model"].append(self.model_json)
            out["usage"].append(json.dumps(self.usage))
        return out

    def _infer_row(self, out: dict[str, list], i: int, scan_id: str) -> None:
        if (deaths := self._deaths_before(scan_id)) > self.max_task_retries:
            lost = _worker_lost(scan_id, deaths)
            out["error_code"][i], out["error_message"][i] = lost.code, lost.message
            return
        t = time.perf_counter()
        try:
            prepared = pickle.loads(out["prepared"][i])
            out["prepared"][i] = None  # the model-grid array goes before the network's memory peak
            labels = None if prepared is None else self.segmenter.infer(prepared)
            if prepared is not None:
                prepared.data = None
            out["prepared"][i] = pickle.dumps((prepared, labels), protocol=5)
        except Exception as exc:  # noqa: BLE001 - e.g. MemoryError: this scan's failure only
            if not isinstance(exc, RayAppError):
                traceback.print_exc()
            out["prepared"][i] = b""
            out["error_code"][i], out["error_message"][i] = _error_fields(exc)
        timings = json.loads(out["timings"][i])
        timings["network_s"] = timings.get("network_s", 0.0) + time.perf_counter() - t
        out["timings"][i] = json.dumps(timings)

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


def _make_finisher(cfg: BatchConfig, spec: TaskSpec, store_uri: str, aside):
    def _finish(row: dict[str, Any]) -> dict[str, Any]:
        """Bring one scan's labels home, build its passport, write its files and passport (CPU task); returns its
        summary row."""
        start = time.perf_counter()
        result = _finished_result(spec, aside, row)
        result.usage.update(json.loads(row["usage"]))
        _write(result, cfg, spec, store_uri)
        timings = result.passport.setdefault("timings", {})
        timings["total_s"] = sum(v for k, v in timings.items() if k in TASK_TIMINGS) + time.perf_counter() - start
        summary = results.summary_row(result.passport, cfg.job_id, result.locations, result.usage)
        try:
            from ray_app.adapters.metrics import record_scan

            record_scan(summary)  # Ray's metrics endpoint: scans by status and code, seconds per stage
        except Exception:  # noqa: BLE001 - metrics never fail a scan
            pass
        return summary

    return _finish


#: Stage times spent before the last task began, added to its own for ``total_s``.
TASK_TIMINGS = ("read_s", "resample_in_s", "roi_crop_s", "network_s")


def _finished_result(spec: TaskSpec, aside, row: dict[str, Any]) -> pipeline.ScanResult:
    """The scan's result: mask and passport, or the failure record of whichever stage failed."""
    timings = json.loads(row["timings"])
    if "network_s" in timings:  # the actor's seconds, which the cost report prices; none for a scan it never had
        timings["segment_s"] = timings["network_s"]
    model = json.loads(row["model"])
    try:
        if row["error_code"]:
            if row["aside"]:  # a scan that failed its fetch or decode has nothing aside: no call to make
                _drop_aside(aside, row["scan_id"])
            exc = from_code(str(row["error_code"]), str(row["error_message"]), scan_id=row["scan_id"])
            raise exc
        scan = _scan_from_aside(aside, row, take=True)
        prepared, labels = pickle.loads(row["prepared"])
    except Exception as exc:  # noqa: BLE001 - recorded as the scan's failure
        return pipeline.failure(row["scan_id"], exc, model, source_uri=row["uri"], timings=timings)
    return pipeline.finish_scan(spec, scan, prepared, labels, model, timings, get_settings())


@lru_cache(maxsize=4)
def worker_store(uri: str) -> PassportStore:
    """The passport store a worker process opens once and keeps for every task it runs (resume, write)."""
    return open_passport_store(uri)


def _write(result: pipeline.ScanResult, cfg: BatchConfig, spec: TaskSpec, store_uri: str) -> pipeline.ScanResult:
    """Write one scan's files and passport; a write failure becomes the scan's failure record."""
    try:
        return results.write_result(
            result,
            ArtifactSink(cfg.output),
            worker_store(store_uri),
            cfg.job_id,
            label_map=spec.output_labels,
            preview=cfg.preview,
            per_structure=cfg.per_structure,
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
            worker_store(store_uri).put(failed.passport, cfg.job_id)
        except Exception:  # noqa: BLE001 - the summary row still records it
            pass
        result.passport, result.mask, result.locations = failed.passport, None, {}
        return result


def _stage_chain(ds, cfg: BatchConfig, spec: TaskSpec, shape: Shape, store_uri: str, starts, aside):
    """CPU tasks (fetch, decode, validate, prepare) -> actors (inference only) -> CPU tasks (finish, passport,
    write); ``roi_subset`` adds its crop round (a second pool: the 6 mm pass's labels choose the crop)."""
    from ray.data import TaskPoolStrategy

    tasks = {"num_cpus": shape.task_cpus, "compute": TaskPoolStrategy(size=shape.task_concurrency)}
    ds = ds.map(_make_preparer(spec, aside), **tasks)
    ds = _segment(ds, cfg, shape, starts)
    if spec.crop_stage is not None:
        ds = _segment(ds.map(_make_cropper(spec, aside), **tasks), cfg, shape, starts)
    return ds.map(_make_finisher(cfg, spec, store_uri, aside), **tasks)


def _segment(ds, cfg: BatchConfig, shape: Shape, starts):
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        SegmentActor,
        fn_constructor_kwargs={
            "fast": cfg.fast,
            "device": cfg.device,
            "roi_subset": cfg.roi_subset,
            "num_threads": shape.threads,
            "memory_limit": cfg.memory_per_actor,
            "starts": starts,
            "max_task_retries": cfg.max_task_retries,
            "gpus": shape.gpus_per_actor,
        },
        batch_size=1,
        compute=ActorPoolStrategy(min_size=shape.min_actors, max_size=shape.max_actors),
        num_cpus=shape.cpus_per_actor,
        num_gpus=shape.gpus_per_actor,
        resources=cfg.actor_resources,
        batch_format="default",
        # Ray Data's pool keeps max_restarts=-1 and max_task_retries=-1: the bound on a scan that kills its
        # actor is SegmentActor's count of starts, not Ray's max_task_retries. Ray counts every failed
        # delivery, and while a lost node is not yet declared dead each one fails within seconds
        # (ActorUnavailableError): max_task_retries=3 (passed as a ray_remote_arg, deprecated in 2.60 with no
        # named parameter) failed 5 of 6 scans as lost after one node kill in tests/test_reliability.py.
        **({"memory": cfg.memory_per_actor} if cfg.memory_per_actor else {}),
    )


def run_batch(cfg: BatchConfig, settings: Settings | None = None) -> BatchReport:
    """Run the whole job, writing its summary in parts as scans finish; returns the job's counts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_app.adapters import plan

    settings = settings or get_settings()
    spec = task_spec("total", fast=cfg.fast, roi_subset=cfg.roi_subset)
    store_uri = cfg.passport_store_uri
    check_manifest_exists(cfg.manifest)
    store = preflight(cfg, spec, settings)  # a wrong store, output or weights costs seconds: before Ray starts
    init_ray()
    try:
        planned = plan.read_plan(cfg.manifest, cfg.limit)
    except ManifestError:
        _withdraw_record(cfg)
        raise
    clear_summary(cfg.summary_uri)
    if not cfg.force:
        planned = plan.resume(planned, store_uri, spec.key, cfg.retry_failed)
    statuses = plan.status_counts(planned)
    todo = statuses[plan.RUN]
    not_run = plan.not_run_summary(planned, cfg.job_id, spec.key)
    counts = plan.collect_counts(plan.write_summary_parts(not_run, cfg.summary_uri, "plan", statuses.total()))

    if todo:
        alive = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
        shape = plan_shape(cfg, ray.cluster_resources(), alive)
        on_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # Ray types ``.remote()`` as ``ActorHandle[T] | type[T]`` (so that ``handle.method`` type-checks); what it
        # returns is always the handle, which ``ray.kill`` below takes.
        starts = cast(
            "ActorHandle[_Starts]", ray.remote(_Starts).options(num_cpus=0, scheduling_strategy=on_driver).remote()
        )
        aside = cast(
            "ActorHandle[_Aside]", ray.remote(_Aside).options(num_cpus=0, scheduling_strategy=on_driver).remote()
        )
        # Every stage turns a scan's own failure into a record, so a block errors only when Ray gives up on it (a
        # task's worker lost more often than Ray retries it, an object lost with its node): the job goes on
        # without it and records its scans below instead of failing as a whole.
        blocks = plan.run_blocks(todo, ray.cluster_resources().get("CPU", 1.0))
        ds = plan.runnable(planned, blocks, max_errored_blocks=blocks)
        ds = _stage_chain(ds, cfg, spec, shape, store_uri, starts, aside)
        progress = plan.Progress(todo, statuses[plan.SKIPPED])
        try:
            counts += plan.collect_counts(plan.write_summary_parts(ds, cfg.summary_uri, "run", todo), progress)
        finally:
            ray.kill(starts)
            ray.kill(aside)
        if counts["rows"] < statuses.total():
            counts = _record_lost(planned, cfg, store, spec)
    if not counts["rows"]:  # an empty manifest still has a summary, with no rows
        write_summary([], f"{cfg.summary_uri}/plan-empty.parquet")
    return BatchReport(cfg.job_id, cfg.summary_uri, dict(counts))


def _withdraw_record(cfg: BatchConfig) -> None:
    """Remove the job's record the preflight wrote: a manifest unusable as a whole means the job never ran, and
    leaves nothing behind. (The preflight writes first so that a wrong output is refused before Ray starts.)"""
    record = cfg.job_uri("job.json")
    storage.delete(record)
    if not storage.is_s3(record):
        folder = os.path.dirname(storage.parse_uri(record).path)
        for empty in (folder, os.path.dirname(folder)):  # _jobs/<job>/, then _jobs/ if no other job is there
            try:
                os.rmdir(empty)
            except OSError:
                break


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
