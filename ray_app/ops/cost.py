"""What the batch job costs on AWS per month and per 1,000 scans, from a finished job's measured numbers.

The design priced is the job-scoped cluster: ``ray-app cluster run`` starts a head, runs one batch job on Spot
workers from zero and tears every node down when the job ends. So the head is paid for the hours jobs run
(plus its own start-up and teardown per job), and each worker node for its share of the scans plus its own
start-up. The always-on Serve endpoint is a separate deployment (a small head all month, replicas from zero
on Spot) and a separate section with its own total, never part of the batch bill.

Measured, from the job summary alone (no object is read but the summary): per scan, the segmentation actor's
seconds, the CPUs and GPUs it was given and the CPUs of the machine it ran on (so CPU-seconds, not wall
seconds, are projected: a run measured with one 1-CPU actor on a laptop prices a 16-vCPU Spot node correctly),
the fetch and write tasks' seconds, every object written and its bytes, and the DynamoDB item's size.
Priced with ``ray_app/ops/prices.json`` (dated, sourced; any key can be overridden by a file). Assumed, and
printed as such: parallel efficiency beyond the measured one, what a vCPU yields, start-up and teardown
minutes, nodes per job, jobs per month, retention, egress share, log volume.

Every line is ``quantity x unit price``; :func:`estimate` returns the lines so the arithmetic can be checked.
Steady state means a month in which ``retention_months`` months of results are stored: the newest month's
large objects (masks, DICOM-SEGs) in S3 Standard, older ones in Glacier Instant Retrieval (the bucket's
lifecycle rule moves objects over 128 KiB after 30 days), small ones (passports, previews) in Standard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray_app.ops.cluster import CLUSTER_YAML

PRICES_FILE = Path(__file__).resolve().parent / "prices.json"
HOURS_PER_MONTH = 730  # AWS's own convention for monthly estimates
DAYS_PER_MONTH = 365 / 12
#: Glacier Instant Retrieval bills an object for at least 90 days, however early it is deleted.
GLACIER_IR_MIN_DAYS = 90
GB = 1024**3  # AWS bills storage and transfer per GiB ("GB")
COMPARE_SCANS_PER_MONTH = 1_000_000  # the second column of the table

#: Parallel efficiency of a segmentation actor at 2 torch threads against 1, t(1) / (2 t(2)): how much of a
#: second CPU turns into speed. Measured with the realistic 3 mm architecture (PlainConvUNet, 16.6 M parameters,
#: random weights) on a 2-core Xeon (one thread per core) shared with other jobs:
#: - one 128x112x112 tile, fp32 (``PYTHONPATH=. python bench/thread_scaling.py --net realistic --repeats 5``,
#:   bench/results/thread-scaling-realistic.json): 0.87 from the fastest runs, 0.82 from the medians, 0.90 from
#:   the CPU-seconds per tile (9.3 at 1 thread, 10.4 at 2);
#: - a whole 512x512x300 CT through the warm Segmenter (8 tiles, resampling, logits, argmax): 85.9 s wall and
#:   85.3 CPU-s at one thread (``bench/thread_scaling.py --scan synthetic``, bench/results/thread-scaling-
#:   synthetic-scan.json; an earlier run under a load of 5-9: 87.6 CPU-s), against 51.4-53.1 s wall at 2 threads
#:   on an idle machine (bench/results/latest.json, "ours"): 85.9 / (2 x 52.2) = 0.82 (0.84 from 87.6). The
#:   same file's own 2-thread run shared its cores with other work (100 CPU-s in 79 s wall): its wall time means
#:   nothing, its CPU-seconds give 0.85;
#: - the real batch job on a 4-tile 3 mm CT, 1-CPU against 2-CPU actor (tests/test_cost.py, quiet machine): 0.75.
#: So 0.83. A small scan gains less: one tile's logits post-processing is single-threaded and dominates it.
#: The phantom network gains less too (0.65-0.71 per tile). Beyond 2 threads Amdahl's law extrapolates it
#: (:func:`efficiency`): 0.41 at 8 threads, 0.62 at 4, which is why the report takes --cpus-per-actor as an
#: assumption. Override with --parallel-efficiency.
PARALLEL_EFFICIENCY_2 = 0.83
#: What a vCPU of the worker instance yields in the cores the CPU-seconds were measured on, by the instance's
#: published threads per core (prices.json ``instance_threads_per_core``, EC2's DescribeInstanceTypes):
#: - 2 (c7i, m7i, c6i, g6, ...: a vCPU is a hyperthread): on dense fp32 convolution a second thread on a core adds
#:   about 20 %, so 16 vCPUs do the work of about 8 x 1.2 = 9.6 cores: 0.6 per vCPU;
#: - 1 (m7a, c7a, r7a: 7th-generation AMD has no SMT, a vCPU is a core): 1.0, a core for a core.
#: Both assumed: this machine has one thread per core and is not an AWS instance, so neither can be measured here.
#: Override with --vcpu-yield.
VCPU_YIELD_SMT = 0.6
VCPU_YIELD_CORE = 1.0
#: A worker node's start-up per job: EC2 launch and boot of the Deep Learning AMI (1-2 min), pulling the
#: prebuilt image from ECR (a few GB: about 1-2 min) and starting Ray. Assumed: not measurable here (no AWS).
NODE_STARTUP_MINUTES = 5.0
#: The head's start-up per job (as a worker's, plus ``ray up``'s SSH setup) and teardown (the summary written,
#: ``ray down``, instance termination). Assumed: not measurable here.
HEAD_STARTUP_MINUTES = 6.0
HEAD_TEARDOWN_MINUTES = 2.0
#: Without --nodes-per-job, a job runs on the number of worker nodes that costs least: each node adds its
#: start-up, each node fewer lengthens the job and so the head's hours; at most cluster.yaml's max workers of the
#: kind, and enough that the job ends within the dead-man's switch's --max-hours (cluster.yaml).
DEADMAN_MAX_HOURS = 12.0  # when cluster.yaml cannot be read
#: Peak memory of one segmentation actor on a full-size CT: 5.2 GB RSS for a 512x512x300 CT with the warm
#: segmenter (bench/results/latest.json, "ours"), 5.5 GB for 512x512x200 through vanilla TotalSegmentator
#: (ENVIRONMENT.md); 6 GB with headroom. A node runs no more actors than fit in MEMORY_USABLE of its memory
#: (the rest: the OS, Ray's raylet and object store, the fetch and write tasks).
ACTOR_MEMORY_GB = 6.0
MEMORY_USABLE = 0.8
#: When cluster.yaml cannot be read: its max workers per kind and its instance types as committed.
DEFAULT_MAX_WORKERS = {"cpu": 16, "gpu": 8}
DEFAULT_INSTANCES = {"cpu": "m7a.4xlarge", "gpu": "g6.xlarge", "head": "m7i.large"}
#: The production job's actors: 2 threads each keep the measured efficiency (0.83), and 8 such actors fit a
#: 16-vCPU, 64 GiB worker. Each reserves 0.1 CPU less (deploy/README.md's --cpus-per-actor 1.9): its CPU-stage
#: task's room beside it, work the model counts in the measured task seconds.
CPUS_PER_ACTOR = 2


class CostInputError(ValueError):
    """A figure the report needs is neither measurable from the summary nor given."""


# ---------------------------------------------------------------------------------------------- prices


def load_prices(override: str | None = None) -> dict:
    """The default price table, with the keys of ``override`` (a local or s3:// JSON file) replacing its own;
    per-instance tables are merged so one instance price can be changed alone."""
    from ray_app import storage

    prices = json.loads(PRICES_FILE.read_text())
    if override:
        for key, value in json.loads(storage.read_bytes(override)).items():
            if isinstance(value, dict) and isinstance(prices.get(key), dict):
                prices[key] = {**prices[key], **value}
            else:
                prices[key] = value
    return prices


def _price(prices: dict, table: str, instance: str) -> float:
    try:
        return float(prices[table][instance])
    except KeyError:
        raise CostInputError(f"no {table} entry for {instance!r}; add it with --prices FILE") from None


def _assumed_note(prices: dict, table: str, instance: str) -> str:
    """' (assumed)' when prices.json marks this price as an assumption rather than a list price (the report's
    footer says why)."""
    return " (assumed)" if f"{table}.{instance}" in (prices.get("assumed") or {}) else ""


def efficiency(threads: float, at_2: float = PARALLEL_EFFICIENCY_2) -> float:
    """Parallel efficiency at ``threads`` torch threads by Amdahl's law, its serial share fitted to the
    efficiency measured at 2: s = 1/e(2) - 1, e(k) = 1 / (1 + (k - 1) s); 1.0 at one thread."""
    if not 0 < at_2 <= 1:
        raise CostInputError(f"parallel efficiency must be in (0, 1], got {at_2}")
    serial = 1 / at_2 - 1
    return 1 / (1 + (max(1.0, threads) - 1) * serial)


def _load_cluster(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def cluster_instances(path: Path = CLUSTER_YAML) -> dict[str, str]:
    """The instance types a job on cluster.yaml gets: the head's, and per worker kind (cpu/gpu) the type Ray's
    autoscaler launches when every type of the kind fits the request equally well. It ranks them by a
    utilization score and, on a tie (same vCPUs and memory), takes the node type whose name sorts last
    (``resource_demand_scheduler.get_nodes_for``); cluster.yaml names its fallbacks so they sort first."""
    try:
        config = _load_cluster(path)
        types = config["available_node_types"]
        out = {"head": types[config["head_node_type"]]["node_config"]["InstanceType"]}
        for kind in ("cpu", "gpu"):
            names = sorted(n for n, t in types.items() if f"spot_{kind}" in (t.get("resources") or {}))
            out[kind] = types[names[-1]]["node_config"]["InstanceType"]
        return out
    except (OSError, KeyError, IndexError, TypeError, ValueError, ImportError):
        return dict(DEFAULT_INSTANCES)


def deadman_max_hours(path: Path = CLUSTER_YAML) -> float:
    """The dead-man's switch's --max-hours in cluster.yaml's head start commands: no job may run longer."""
    import re

    try:
        commands = " ".join(_load_cluster(path)["head_start_ray_commands"])
        found = re.search(r"ray_app\.ops\.deadman\b.*?--max-hours\s+([0-9.]+)", commands)
        return float(found.group(1)) if found else DEADMAN_MAX_HOURS  # no switch in the commands: the default
    except (OSError, KeyError, TypeError, ValueError, AttributeError, ImportError):
        return DEADMAN_MAX_HOURS


def cluster_max_workers(kind: str, path: Path = CLUSTER_YAML) -> tuple[int, str]:
    """The most worker nodes of ``kind`` (cpu/gpu: node types labelled spot_cpu/spot_gpu) cluster.yaml allows,
    and where the figure comes from."""
    try:
        config = _load_cluster(path)
        types = config["available_node_types"].values()
        per_type = sum(int(t.get("max_workers", 0)) for t in types if f"spot_{kind}" in (t.get("resources") or {}))
        total = min(per_type, int(config.get("max_workers", per_type)))
        if total > 0:
            return total, "cluster.yaml"
    except (OSError, KeyError, TypeError, ValueError, ImportError):
        pass
    return DEFAULT_MAX_WORKERS[kind], "cluster.yaml as committed (not readable here)"


# -------------------------------------------------------------------------------------------- measured


@dataclass(frozen=True)
class Measured:
    """What a finished job measured, averaged over the scans that succeeded.

    ``actor_seconds``: the segmentation actor's time per scan (``segment_s + passport_s``), during which it holds
    ``actor_cpus`` CPUs (torch threads) and ``actor_gpus`` GPUs; ``threads`` maps each thread count the actor
    could really use (its CPUs, at most the CPUs of the machine it ran on) to the mean actor seconds and the
    number of scans at that count. ``task_seconds``: the fetch (download, decode) and write tasks, each one
    single-threaded CPU task (``read_s`` + the writer's time, ``total_s`` less the other stages).
    """

    summaries: tuple[str, ...]
    scans_ok: int
    seconds_per_scan: float
    segment_seconds: float
    actor_seconds: float
    task_seconds: float
    actor_cpus: float
    actor_gpus: float
    node_cpus: int | None
    threads: dict[str, tuple[float, int]]
    cpu_seconds_per_scan: float  # as measured: actor threads x actor seconds + task seconds
    gpu_seconds_per_scan: float  # actor GPUs x actor seconds
    objects_per_scan: float | None
    bytes_per_scan: float | None
    large_objects_per_scan: float | None
    large_bytes_per_scan: float | None
    store_item_bytes: float | None
    store_index_bytes: float | None

    def work_seconds(self, at_2: float) -> float:
        """One-thread-equivalent CPU-seconds per scan: what a single fully efficient core would take."""
        actor = sum(n * float(k) * t * efficiency(float(k), at_2) for k, (t, n) in self.threads.items()) / self.scans_ok
        return actor + self.task_seconds


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values a summary recorded; None when none did (a column an older summary lacks)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _mean_of(values: Sequence[float | None], what: str) -> float:
    """The mean of values every successful scan has by construction (its timings, the actor's CPUs as recorded or
    given): :func:`measure` has already refused a summary without them, so an empty list is a bug, said as such."""
    mean = _mean(values)
    if mean is None:
        raise CostInputError(f"no {what} in the summary's successful scans")
    return mean


def _ok_rows(summary_uris: list[str]) -> list[dict]:
    """The scans that succeeded and were timed: the only ones whose seconds say what a scan costs."""
    from ray_app.core.errors import InvalidSummary, RayAppError
    from ray_app.storage.sinks import read_summary

    rows = []
    for uri in summary_uris:
        try:
            rows += read_summary(uri)
        except InvalidSummary as exc:  # a file, but not Parquet: the message names it
            raise CostInputError(exc.message) from exc
        except RayAppError as exc:  # absent, unreachable
            raise CostInputError(f"cannot read job summary {uri}: {exc.message}") from exc
    ok = [
        r for r in rows if r.get("status") == "ok" and r.get("total_s") is not None and r.get("segment_s") is not None
    ]
    if not ok:
        raise CostInputError(f"no successful scans with timings in {', '.join(summary_uris)}")
    return ok


def _row_actor_cpus(row: dict, actor_cpus: float | None) -> float:
    """The CPUs the scan's actor had: as the summary recorded them, else as given for an older summary."""
    cpus = row.get("actor_cpus") if row.get("actor_cpus") is not None else actor_cpus
    if cpus is None:
        raise CostInputError(
            "the summary does not say how many CPUs the segmentation actor had (written before "
            "the batch job recorded it): pass --measured-actor-cpus N"
        )
    return cpus


@dataclass(frozen=True)
class _ScanSeconds:
    """One scan's seconds, split the way they are priced: the actor's at the threads it could use, the tasks'."""

    threads: str  # the thread count the actor could use, as Measured.threads keys it
    actor: float
    tasks: float
    cpu: float
    gpu: float


def _scan_seconds(row: dict, actor_cpus: float | None) -> _ScanSeconds:
    """A scan's seconds from its summary row: the fetch and write tasks are what the actor's time leaves of total_s."""
    cpus = _row_actor_cpus(row, actor_cpus)
    node = row.get("node_cpus") or cpus
    used = max(1.0, min(float(cpus), float(node)))  # torch threads beyond the machine's CPUs add nothing
    actor = row["segment_s"] + (row.get("passport_s") or 0.0)
    tasks = (row.get("read_s") or 0.0) + max(0.0, row["total_s"] - (row.get("read_s") or 0.0) - actor)
    return _ScanSeconds(f"{used:g}", actor, tasks, used * actor + tasks, (row.get("actor_gpus") or 0.0) * actor)


def measure(summary_uris: list[str], actor_cpus: float | None = None) -> Measured:
    """Read job summaries (Parquet, local or s3://). ``actor_cpus`` stands in for a summary written before the
    batch job recorded what its actors had (then the machine's CPUs are taken to be at least that)."""
    ok = _ok_rows(summary_uris)
    scans = [_scan_seconds(r, actor_cpus) for r in ok]
    threads: dict[str, list[float]] = {}
    for scan in scans:
        threads.setdefault(scan.threads, []).append(scan.actor)
    return Measured(
        summaries=tuple(summary_uris),
        scans_ok=len(ok),
        seconds_per_scan=_mean_of([r["total_s"] for r in ok], "total_s"),
        segment_seconds=_mean_of([r["segment_s"] for r in ok], "segment_s"),
        actor_seconds=_mean_of([s.actor for s in scans], "actor seconds"),
        task_seconds=_mean_of([s.tasks for s in scans], "task seconds"),
        actor_cpus=_mean_of([_row_actor_cpus(r, actor_cpus) for r in ok], "actor CPUs"),
        actor_gpus=_mean_of([r.get("actor_gpus") or 0.0 for r in ok], "actor GPUs"),
        node_cpus=min((r["node_cpus"] for r in ok if r.get("node_cpus")), default=None),
        threads={k: (sum(v) / len(v), len(v)) for k, v in sorted(threads.items())},
        cpu_seconds_per_scan=_mean_of([s.cpu for s in scans], "CPU-seconds"),
        gpu_seconds_per_scan=_mean_of([s.gpu for s in scans], "GPU-seconds"),
        objects_per_scan=_mean([r.get("objects_written") for r in ok]),
        bytes_per_scan=_mean([r.get("bytes_written") for r in ok]),
        large_objects_per_scan=_mean([r.get("large_objects_written") for r in ok]),
        large_bytes_per_scan=_mean([r.get("large_bytes_written") for r in ok]),
        store_item_bytes=_mean([r.get("store_item_bytes") for r in ok]),
        store_index_bytes=_mean([r.get("store_index_bytes") for r in ok]),
    )


# ------------------------------------------------------------------------------------------ assumptions


@dataclass(frozen=True)
class Assumptions:
    """The figures a summary cannot measure. Defaults follow ``cluster.yaml`` (instance types: what a job on it
    gets) and the constants above."""

    scans_per_month: int
    cpu_instance: str = field(default_factory=lambda: cluster_instances()["cpu"])
    gpu_instance: str = field(default_factory=lambda: cluster_instances()["gpu"])
    head_instance: str = field(default_factory=lambda: cluster_instances()["head"])
    cpus_per_actor: float = CPUS_PER_ACTOR  # the production job's --cpus-per-actor (deploy/README.md)
    actor_memory_gb: float = ACTOR_MEMORY_GB  # a node runs no more actors than fit in its memory
    parallel_efficiency: float = PARALLEL_EFFICIENCY_2  # at 2 threads; Amdahl beyond
    vcpu_yield: float | None = None  # None: by the instance's threads per core (VCPU_YIELD_SMT / _CORE)
    jobs_per_month: int = 30
    nodes_per_job: int | None = None  # None: the cheapest count within cluster.yaml (see _plan)
    node_startup_minutes: float = NODE_STARTUP_MINUTES
    head_startup_minutes: float = HEAD_STARTUP_MINUTES
    head_teardown_minutes: float = HEAD_TEARDOWN_MINUTES
    ebs_gb_per_node: float = 150
    retention_months: int = 12
    egress_fraction: float = 1.0  # share of the results downloaded out of AWS once
    log_kb_per_scan: float = 10  # to CloudWatch Logs, when a log agent ships them
    mask_mb: float | None = None  # for a summary without bytes_written: the mask's size
    passport_kb: float | None = None  # ... and the passport's
    item_kb: float | None = None  # for a summary without store_item_bytes: the DynamoDB item's size
    # The inputs' opt-in lifecycle rule (jobs/setup_aws.py --input-glacier-days): priced only when given.
    input_glacier_days: int | None = None
    input_mb: float | None = None  # one scan's input as stored (a NIfTI file, or a DICOM series' files together)
    input_objects_per_scan: float = 1  # 1 for a NIfTI file; a DICOM series has one object per slice
    input_retention_months: int | None = None  # None: as long as the results (retention_months)
    input_reread_fraction: float = 0.0  # of the inputs read again after moving (a re-run): Glacier IR retrieval
    # The always-on endpoint, a deployment of its own.
    serve_head_instance: str = "m7i.large"
    serve_requests_per_month: int = 1000
    serve_scale_ups_per_month: int = 30  # replicas come up from zero about once a day
    serve_idle_minutes: float = 5  # a replica node stays this long after its last request (idle_timeout_minutes)


# ---------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class LineItem:
    item: str
    quantity: float
    unit: str
    unit_price: float
    basis: str

    @property
    def monthly_usd(self) -> float:
        return self.quantity * self.unit_price


@dataclass
class CostReport:
    assumptions: Assumptions
    measured: Measured
    gpu_measured: Measured | None
    prices: dict
    compute: dict[str, LineItem | None]  # alternatives: the worker node-hours of one of them run the scans
    head: dict[str, LineItem | None]  # the batch head's hours, which follow that alternative's job hours
    shared: list[LineItem]  # paid whichever compute runs them
    serve: list[LineItem]  # the always-on endpoint: its own deployment, its own total
    plan: dict[str, dict] = field(default_factory=dict)  # per alternative: nodes per job, job hours, ...
    inputs: list[LineItem] = field(default_factory=list)  # the input bucket's opt-in rule: its own section

    def per_1k(self, usd: float) -> float:
        return usd / self.assumptions.scans_per_month * 1000

    def total(self, option: str) -> float | None:
        line, head = self.compute[option], self.head[option]
        if line is None or head is None:  # not measured: estimate() leaves both out together
            return None
        return line.monthly_usd + head.monthly_usd + sum(s.monthly_usd for s in self.shared)

    def serve_total(self) -> float:
        return sum(s.monthly_usd for s in self.serve)

    def input_saving(self) -> float | None:
        """What the input rule saves a month (positive: a saving): minus the sum of its lines after the first,
        which is the inputs' storage without the rule, for scale."""
        return -sum(x.monthly_usd for x in self.inputs[1:]) if self.inputs else None


def _node_hour_price(prices: dict, table: str, instance: str, a: Assumptions) -> float:
    """Instance price plus its root volume's, per hour."""
    return _price(prices, table, instance) + a.ebs_gb_per_node * prices["ebs_gp3_per_gb_month"] / HOURS_PER_MONTH


def vcpu_yield(prices: dict, instance: str, a: Assumptions) -> float:
    """What one vCPU of ``instance`` yields in measured cores: given, or by its threads per core."""
    if a.vcpu_yield is not None:
        return a.vcpu_yield
    per_core = _price(prices, "instance_threads_per_core", instance)
    return VCPU_YIELD_CORE if per_core == 1 else VCPU_YIELD_SMT


def _yield_basis(prices: dict, instance: str, a: Assumptions) -> str:
    if a.vcpu_yield is not None:
        return f"yield {a.vcpu_yield:g} (given)"
    per_core = _price(prices, "instance_threads_per_core", instance)
    what = "a vCPU is a core" if per_core == 1 else f"{per_core:g} vCPUs per core"
    return f"yield {vcpu_yield(prices, instance, a):g} ({what})"


def _plan(kind: str, scan_node_hours: float, a: Assumptions, node_hourly: float, head_hourly: float) -> dict:
    """Nodes per job and the job's hours, from the month's node-hours of scan work: the given number, or the one
    that costs least (each node's start-up against the head's hours while the job runs), at most cluster.yaml's
    max workers, and enough for the job to end within the dead-man's switch's maximum lifetime."""
    per_job = scan_node_hours / a.jobs_per_month
    overhead = (a.head_startup_minutes + a.node_startup_minutes + a.head_teardown_minutes) / 60
    max_workers, source = cluster_max_workers(kind)
    if a.nodes_per_job is not None:
        nodes, why = a.nodes_per_job, "given"
    else:
        limit = deadman_max_hours()

        def monthly(n: int) -> float:
            return head_hourly * (overhead + per_job / n) + n * node_hourly * a.node_startup_minutes / 60

        fits = [n for n in range(1, max_workers + 1) if overhead + per_job / n <= limit] or [max_workers]
        nodes = min(fits, key=monthly)  # on a tie, fewer nodes
        why = (
            f"the cheapest count: {a.node_startup_minutes:g} min start-up per node against the head's hours;"
            f" at most {max_workers} ({source}), the job within the switch's {limit:g} h"
        )
    scan_hours = per_job / nodes
    return {
        "nodes_per_job": nodes,
        "nodes_basis": why,
        "scan_node_hours_per_job": per_job,
        "scan_hours_per_job": scan_hours,
        "job_hours": overhead + scan_hours,
    }


def _nodes(plan: dict) -> str:
    n = plan["nodes_per_job"]
    return f"{n} node{'s' if n != 1 else ''}"


def _cpu_lines(label: str, table: str, m: Measured, prices: dict, a: Assumptions) -> tuple[LineItem, dict]:
    vcpus = _price(prices, "instance_vcpus", a.cpu_instance)
    yield_ = vcpu_yield(prices, a.cpu_instance, a)
    e_target = efficiency(a.cpus_per_actor, a.parallel_efficiency)
    work = m.work_seconds(a.parallel_efficiency)
    actor_work = work - m.task_seconds
    # Per scan on the target node: the actor's work at the target's thread count, the tasks single-threaded...
    node_seconds = (actor_work / e_target + m.task_seconds) / (vcpus * yield_)
    # ... unless the actors that fill its vCPUs do not fit in its memory: then fewer actors run, and each
    # scan takes its actor's wall time over the actors that fit.
    memory = _price(prices, "instance_memory_gib", a.cpu_instance)
    fit = math.floor(memory * MEMORY_USABLE / a.actor_memory_gb)
    wanted = max(1, math.floor(vcpus / a.cpus_per_actor))
    if fit < 1:
        raise CostInputError(f"a {a.actor_memory_gb:g} GB actor does not fit in a {a.cpu_instance} ({memory:g} GiB)")
    memory_note = ""
    if fit < wanted:
        threads = min(a.cpus_per_actor, vcpus)
        node_seconds = max(node_seconds, actor_work / (threads * e_target * yield_) / fit)
        memory_note = f" (memory: {fit} of {wanted} actors fit at {a.actor_memory_gb:g} GB)"
    scan_node_hours = a.scans_per_month * node_seconds / 3600
    hourly = _node_hour_price(prices, table, a.cpu_instance, a)
    head_hourly = _node_hour_price(prices, "ec2_on_demand_per_hour", a.head_instance, a)
    plan = _plan("cpu", scan_node_hours, a, hourly, head_hourly)
    plan["actors_per_node"] = min(fit, wanted)
    startup = plan["nodes_per_job"] * a.jobs_per_month * a.node_startup_minutes / 60
    measured_at = ", ".join(f"{k} thread{'s' if k != '1' else ''} x {t:.1f} s" for k, (t, _) in m.threads.items())
    line = LineItem(
        f"compute: {label} {a.cpu_instance}",
        scan_node_hours + startup,
        "node-h",
        hourly,
        f"{m.cpu_seconds_per_scan:.1f} CPU-s/scan measured (actor {measured_at}, tasks {m.task_seconds:.1f} s)"
        f" = {work:.1f} 1-thread-s; on {vcpus:g} vCPU x {_yield_basis(prices, a.cpu_instance, a)},"
        f" {plan['actors_per_node']} x {a.cpus_per_actor:g}-thread actors at {e_target:.2f} efficiency{memory_note}:"
        f" {node_seconds:.2f} node-s/scan; + {_nodes(plan)} x {a.jobs_per_month} jobs x {a.node_startup_minutes:g}"
        f" min start-up; price{_assumed_note(prices, table, a.cpu_instance)} incl. {a.ebs_gb_per_node:g} GB gp3",
    )
    return line, plan


def _gpu_lines(label: str, table: str, m: Measured, prices: dict, a: Assumptions) -> tuple[LineItem, dict]:
    gpus = _price(prices, "instance_gpus", a.gpu_instance)
    vcpus = _price(prices, "instance_vcpus", a.gpu_instance)
    if m.gpu_seconds_per_scan <= 0:
        raise CostInputError("the GPU summary's actors had no GPU (actor_gpus 0): is it a CPU run?")
    gpu_bound = m.gpu_seconds_per_scan / gpus
    cpu_bound = m.task_seconds / (vcpus * vcpu_yield(prices, a.gpu_instance, a))  # fetch and write beside it
    node_seconds = max(gpu_bound, cpu_bound)
    scan_node_hours = a.scans_per_month * node_seconds / 3600
    hourly = _node_hour_price(prices, table, a.gpu_instance, a)
    head_hourly = _node_hour_price(prices, "ec2_on_demand_per_hour", a.head_instance, a)
    plan = _plan("gpu", scan_node_hours, a, hourly, head_hourly)
    plan["actors_per_node"] = max(1, math.floor(gpus / max(m.actor_gpus, 1e-9)))
    startup = plan["nodes_per_job"] * a.jobs_per_month * a.node_startup_minutes / 60
    line = LineItem(
        f"compute: {label} {a.gpu_instance}",
        scan_node_hours + startup,
        "node-h",
        hourly,
        f"{m.gpu_seconds_per_scan:.1f} GPU-s/scan measured ({m.actor_gpus:g} GPU x {m.actor_seconds:.1f} s) on"
        f" {gpus:g} GPU/node; tasks {m.task_seconds:.1f} CPU-s beside it on {vcpus:g} vCPU"
        f"{' (the bound)' if cpu_bound > gpu_bound else ''}; + {_nodes(plan)} x {a.jobs_per_month}"
        f" jobs x {a.node_startup_minutes:g} min start-up; price incl. {a.ebs_gb_per_node:g} GB gp3",
    )
    return line, plan


def _head_line(plan: dict, prices: dict, a: Assumptions) -> LineItem:
    per_job_overhead = a.head_startup_minutes + a.node_startup_minutes + a.head_teardown_minutes
    return LineItem(
        f"batch head: on-demand {a.head_instance}",
        a.jobs_per_month * plan["job_hours"],
        "h",
        _node_hour_price(prices, "ec2_on_demand_per_hour", a.head_instance, a),
        f"job-scoped: {a.jobs_per_month} jobs x ({plan['scan_hours_per_job']:.2f} h of scans on"
        f" {_nodes(plan)} + {per_job_overhead:g} min: head start-up {a.head_startup_minutes:g},"
        f" workers' {a.node_startup_minutes:g}, teardown {a.head_teardown_minutes:g}); incl. its gp3 volume",
    )


def _serve_lines(m: Measured, prices: dict, a: Assumptions) -> list[LineItem]:
    vcpus = _price(prices, "instance_vcpus", a.cpu_instance)
    e_target = efficiency(a.cpus_per_actor, a.parallel_efficiency)
    actor_work = m.work_seconds(a.parallel_efficiency) - m.task_seconds
    # A request is fetched, segmented and answered inside the replica: all of it at the replica's threads.
    node_seconds = (actor_work + m.task_seconds) / e_target / (vcpus * vcpu_yield(prices, a.cpu_instance, a))
    idle_hours = a.serve_scale_ups_per_month * (a.node_startup_minutes + a.serve_idle_minutes) / 60
    return [
        LineItem(
            f"serve head: on-demand {a.serve_head_instance}",
            HOURS_PER_MONTH,
            "h",
            _node_hour_price(prices, "ec2_on_demand_per_hour", a.serve_head_instance, a),
            "always on (Serve's proxy and controller, no replicas); incl. its gp3 volume",
        ),
        LineItem(
            f"serve replicas: Spot {a.cpu_instance}",
            a.serve_requests_per_month * node_seconds / 3600 + idle_hours,
            "node-h",
            _node_hour_price(prices, "ec2_spot_per_hour", a.cpu_instance, a),
            f"{a.serve_requests_per_month:,} requests (assumed) x {node_seconds:.2f} node-s (the batch job's"
            f" per-scan work at {a.cpus_per_actor:g} threads) + {a.serve_scale_ups_per_month} scale-ups from zero"
            f" x ({a.node_startup_minutes:g} min start-up + {a.serve_idle_minutes:g} min idle)",
        ),
    ]


def _check_input_rule(a: Assumptions) -> float:
    """Refuse an input rule that cannot be priced; else one scan's input size in MB (given, so not None)."""
    if (
        a.input_mb is None
        or a.input_mb <= 0
        or a.input_glacier_days is None
        or a.input_glacier_days < 1
        or a.input_objects_per_scan <= 0
    ):
        raise CostInputError(
            "--input-glacier-days needs --input-mb (one scan's input as stored, > 0), at least 1 day and"
            " --input-objects-per-scan > 0"
        )
    return a.input_mb


def _input_moves(a: Assumptions, input_mb: float, days: int, months: int) -> tuple[bool, float, str]:
    """Whether the rule moves the inputs at all (it skips objects of at most 128 KiB, and objects deleted before
    its day), the months each scan's input then spends in Glacier IR (at least its 90-day minimum), and why."""
    from ray_app.storage.sinks import LARGE_OBJECT_BYTES

    per_object = input_mb * 1024**2 / a.input_objects_per_scan
    moved = per_object > LARGE_OBJECT_BYTES and days < months * DAYS_PER_MONTH  # the rule's size floor, and in time
    glacier_months = max(months - days / DAYS_PER_MONTH, GLACIER_IR_MIN_DAYS / DAYS_PER_MONTH) if moved else 0.0
    why = (
        f"{input_mb:g} MB per scan in {a.input_objects_per_scan:g} object(s), kept {months} months"
        if moved
        else f"nothing moves: {'objects of at most 128 KiB' if per_object <= LARGE_OBJECT_BYTES else 'deleted first'}"
    )
    return moved, glacier_months, why


def _input_lines(prices: dict, a: Assumptions) -> list[LineItem]:
    """The input bucket's opt-in Glacier IR rule in steady state: each month's inputs spend ``input_glacier_days`` in
    Standard, then the rest of their retention in Glacier IR (at least its 90-day minimum). Lines: the inputs'
    storage without the rule (for scale; in no total), then the rule's effect: storage moved (at Glacier IR's price
    less Standard's: negative), transitions and retrievals. The inputs' storage is the user's own bucket, not the
    batch bill, so the saving is reported beside the batch total, never subtracted from it."""
    if a.input_glacier_days is None:
        return []
    input_mb = _check_input_rule(a)
    n, days = a.scans_per_month, a.input_glacier_days
    months = a.input_retention_months or a.retention_months
    gb = input_mb * 1024**2 / GB
    moved, glacier_months, why = _input_moves(a, input_mb, days, months)
    standard, glacier = prices["s3_standard_per_gb_month"], prices["s3_glacier_ir_per_gb_month"]
    return [
        LineItem(
            "inputs without the rule: S3 Standard",
            n * gb * months,
            "GB-month",
            standard,
            f"for scale, in no total: {n:,} scans x {input_mb:g} MB kept {months} months",
        ),
        LineItem(
            f"inputs to Glacier IR after {days} d: storage",
            n * gb * glacier_months,
            "GB-month",
            glacier - standard,
            f"{why}; {glacier_months:.2f} months each in Glacier IR instead of Standard"
            f" (at least its {GLACIER_IR_MIN_DAYS}-day minimum)",
        ),
        LineItem(
            f"inputs to Glacier IR after {days} d: transitions",
            n * a.input_objects_per_scan / 1000 if moved else 0.0,
            "1k requests",
            prices["s3_glacier_ir_transition_per_1000"],
            f"{a.input_objects_per_scan:g} object(s) per scan (a DICOM series: one per slice)",
        ),
        LineItem(
            f"inputs to Glacier IR after {days} d: retrievals",
            n * gb * a.input_reread_fraction if moved else 0.0,
            "GB",
            prices["s3_glacier_ir_retrieval_per_gb"],
            f"{a.input_reread_fraction:g} of the inputs read again after moving (a re-run; assumed)",
        ),
    ]


def _given_sizes(mask_mb: float, passport_kb: float) -> tuple[dict[str, float], str]:
    """What a scan writes from --mask-mb and --passport-kb: for a summary whose masks are not the real ones'."""
    from ray_app.storage.sinks import LARGE_OBJECT_BYTES

    mask, passport = mask_mb * 1024**2, passport_kb * 1024
    large = [x for x in (mask, passport) if x > LARGE_OBJECT_BYTES]
    s: dict[str, float] = {
        "objects": 2,
        "bytes": mask + passport,
        "large_objects": len(large),
        "large_bytes": sum(large),
    }
    return s, f"given: mask {mask_mb:g} MB + passport {passport_kb:g} KB"


def _measured_sizes(m: Measured) -> tuple[dict[str, float], str]:
    """What a scan writes as the summary measured it; refused when the summary did not count it."""
    from ray_app.storage.sinks import LARGE_OBJECT_BYTES

    objects, total = m.objects_per_scan, m.bytes_per_scan
    large_objects, large = m.large_objects_per_scan, m.large_bytes_per_scan
    if objects is None or total is None or large_objects is None or large is None:
        raise CostInputError(
            "the summary does not record the objects written per scan (written before the batch "
            "job counted them): re-run with this version, or pass --mask-mb and --passport-kb"
        )
    s = {"objects": objects, "bytes": total, "large_objects": large_objects, "large_bytes": large}
    basis = (
        f"measured {objects:.2f} objects, {total / 1024**2:.2f} MB per scan"
        f" ({large / 1024**2:.2f} MB in {large_objects:.2f} objects over"
        f" {LARGE_OBJECT_BYTES // 1024} KiB)"
    )
    return s, basis


def _item_sizes(m: Measured, a: Assumptions) -> tuple[float, float]:
    """The DynamoDB item's bytes and its job-index copy's: given (--item-kb) or measured."""
    if a.item_kb is not None:
        return a.item_kb * 1024, m.store_index_bytes or 100
    if m.store_item_bytes is None or m.store_index_bytes is None:
        raise CostInputError(
            "the summary does not record the DynamoDB item size (written before the batch job "
            "measured it): re-run with this version, or pass --item-kb"
        )
    return m.store_item_bytes, m.store_index_bytes


def _sizes(m: Measured, a: Assumptions) -> tuple[dict[str, float], str]:
    """Per scan: objects and bytes written (large ones apart) and the DynamoDB item sizes."""
    if a.mask_mb is not None or a.passport_kb is not None:
        if a.mask_mb is None or a.passport_kb is None:
            raise CostInputError("give both --mask-mb and --passport-kb, or neither")
        s, basis = _given_sizes(a.mask_mb, a.passport_kb)
    else:
        s, basis = _measured_sizes(m)
    s["item"], s["index_item"] = _item_sizes(m, a)
    return s, basis


def _check_assumptions(a: Assumptions) -> None:
    """Refuse figures no month can have, before any of them is priced."""
    if (
        a.scans_per_month <= 0
        or a.jobs_per_month <= 0
        or a.retention_months < 1
        or a.cpus_per_actor <= 0
        or (a.vcpu_yield is not None and not 0 < a.vcpu_yield <= 1)
        or (a.nodes_per_job is not None and a.nodes_per_job <= 0)
    ):
        raise CostInputError(
            "scans and jobs per month, CPUs per actor and nodes per job must be positive, retention "
            "at least 1 month, vCPU yield in (0, 1]"
        )


def _compute_alternatives(
    measured: Measured, gpu_measured: Measured | None, p: dict, a: Assumptions
) -> tuple[dict[str, LineItem | None], dict[str, LineItem | None], dict[str, dict]]:
    """Per way to run the scans (Spot or on-demand, CPU or GPU): its workers' line, the batch head's line its job
    hours need, and its plan; both lines None for a kind no summary measured."""
    compute: dict[str, LineItem | None] = {}
    head: dict[str, LineItem | None] = {}
    plan: dict[str, dict] = {}
    alternatives = {
        "Spot CPU": (_cpu_lines, "Spot", "ec2_spot_per_hour", measured),
        "on-demand CPU": (_cpu_lines, "on-demand", "ec2_on_demand_per_hour", measured),
        "Spot GPU": (_gpu_lines, "Spot", "ec2_spot_per_hour", gpu_measured),
        "on-demand GPU": (_gpu_lines, "on-demand", "ec2_on_demand_per_hour", gpu_measured),
    }
    for option, (lines, label, table, m) in alternatives.items():
        if m is None:
            compute[option] = head[option] = None
            continue
        compute[option], plan[option] = lines(label, table, m, p, a)
        head[option] = _head_line(plan[option], p, a)
    return compute, head, plan


def _s3_lines(sizes: dict[str, float], size_basis: str, p: dict, a: Assumptions) -> list[LineItem]:
    """The results in S3: the newest month's large objects and every small one in Standard, the older large ones
    in Glacier IR; the requests that write and move them, and the inputs' reads."""
    n, retention = a.scans_per_month, a.retention_months
    large_gb, small_gb = sizes["large_bytes"] / GB, (sizes["bytes"] - sizes["large_bytes"]) / GB
    return [
        LineItem(
            "S3 Standard: new large + all small objects",
            n * (large_gb + retention * small_gb),
            "GB-month",
            p["s3_standard_per_gb_month"],
            f"{size_basis}; {retention} months kept",
        ),
        LineItem(
            "S3 Glacier IR: older large objects",
            n * large_gb * (retention - 1),
            "GB-month",
            p["s3_glacier_ir_per_gb_month"],
            f"lifecycle rule after 30 days; {retention - 1} months' worth",
        ),
        LineItem(
            "S3 PUT: results",
            n * sizes["objects"] / 1000,
            "1k requests",
            p["s3_put_per_1000"],
            f"{sizes['objects']:.2f} objects written per scan",
        ),
        LineItem("S3 GET: inputs", n * 2 / 1000, "1k requests", p["s3_get_per_1000"], "HEAD + GET per scan"),
        LineItem(
            "S3 lifecycle transitions",
            n * sizes["large_objects"] / 1000,
            "1k requests",
            p["s3_glacier_ir_transition_per_1000"],
            f"{sizes['large_objects']:.2f} large objects per scan",
        ),
    ]


def _dynamodb_lines(sizes: dict[str, float], p: dict, a: Assumptions) -> list[LineItem]:
    """The results table: one item per scan and its job-index copy, written once, read once by the resume check."""
    n, retention = a.scans_per_month, a.retention_months
    item_kb = math.ceil(sizes["item"] / 1024)  # DynamoDB bills writes per started KB, reads per started 4 KB
    index_kb = math.ceil(sizes["index_item"] / 1024)
    return [
        LineItem(
            "DynamoDB writes (table + job index)",
            n * (item_kb + index_kb) / 1e6,
            "M write units",
            p["dynamodb_write_per_million"],
            f"{sizes['item']:.0f} B compact item ({item_kb} units) + {sizes['index_item']:.0f} B index copy"
            f" ({index_kb})",
        ),
        LineItem(
            "DynamoDB reads (resume check)",
            n * math.ceil(sizes["item"] / 4096) / 1e6,
            "M read units",
            p["dynamodb_read_per_million"],
            "one strongly consistent GetItem per scan",
        ),
        LineItem(
            "DynamoDB storage",
            n * retention * (sizes["item"] + sizes["index_item"] + 200) / GB,
            "GB-month",
            p["dynamodb_storage_per_gb_month"],
            f"item + index copy + 100 B overhead each, {retention} months",
        ),
    ]


def _egress_and_log_lines(sizes: dict[str, float], p: dict, a: Assumptions) -> list[LineItem]:
    """What leaves AWS (the results downloaded) and what the job logs: both assumed, neither measurable here."""
    n, retention = a.scans_per_month, a.retention_months
    large_gb, small_gb = sizes["large_bytes"] / GB, (sizes["bytes"] - sizes["large_bytes"]) / GB
    return [
        LineItem(
            "egress to the internet",
            n * (large_gb + small_gb) * a.egress_fraction,
            "GB",
            p["egress_internet_per_gb"],
            f"{a.egress_fraction:g} of the results downloaded once (assumed)",
        ),
        LineItem(
            "CloudWatch Logs ingestion",
            n * a.log_kb_per_scan * 1024 / GB,
            "GB",
            p["cloudwatch_logs_ingest_per_gb"],
            f"{a.log_kb_per_scan:g} KB per scan (assumed)",
        ),
        LineItem(
            "CloudWatch Logs storage",
            n * a.log_kb_per_scan * 1024 / GB * retention,
            "GB-month",
            p["cloudwatch_logs_storage_per_gb_month"],
            f"{retention} months kept",
        ),
    ]


def estimate(
    measured: Measured, assumptions: Assumptions, prices: dict, gpu_measured: Measured | None = None
) -> CostReport:
    """All line items for ``assumptions.scans_per_month``: the compute alternatives with their heads, then the
    lines every alternative shares (S3, DynamoDB, egress, logs), the Serve endpoint and the input rule apart."""
    a, p = assumptions, prices
    _check_assumptions(a)
    sizes, size_basis = _sizes(measured, a)
    compute, head, plan = _compute_alternatives(measured, gpu_measured, p, a)
    shared = [*_s3_lines(sizes, size_basis, p, a), *_dynamodb_lines(sizes, p, a), *_egress_and_log_lines(sizes, p, a)]
    return CostReport(
        a, measured, gpu_measured, prices, compute, head, shared, _serve_lines(measured, p, a), plan, _input_lines(p, a)
    )


def estimate_at(
    volumes: list[int], measured: Measured, assumptions: Assumptions, prices: dict, gpu_measured: Measured | None = None
) -> list[CostReport]:
    """One report per monthly volume, all else equal."""
    return [
        estimate(measured, dataclasses.replace(assumptions, scans_per_month=v), prices, gpu_measured) for v in volumes
    ]


# ------------------------------------------------------------------------------------------------ output


def _volume(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def _preamble(reports: list[CostReport]) -> list[str]:
    """What the table rests on: the volumes and prices, what was measured, what is assumed."""
    first = reports[0]
    a, m, p = first.assumptions, first.measured, first.prices
    threads = ", ".join(f"{k} thread{'s' if k != '1' else ''}: {t:.1f} s x {n}" for k, (t, n) in m.threads.items())
    out = [
        (
            f"Cost estimate, scans/month: {', '.join(f'{r.assumptions.scans_per_month:,}' for r in reports)};"
            f" {p.get('region', '?')}, prices taken {p.get('taken', '?')}"
        ),
        (
            f"measured: {m.scans_ok} ok scans in {', '.join(m.summaries)}: actor {m.actor_seconds:.1f} s/scan"
            f" ({threads}; node CPUs {m.node_cpus}), fetch + write tasks {m.task_seconds:.1f} s"
            f" -> {m.cpu_seconds_per_scan:.1f} CPU-s/scan"
        ),
        (
            f"assumed: parallel efficiency {a.parallel_efficiency:g} at 2 threads (measured: a whole CT 0.82-0.84),"
            " Amdahl beyond:"
            f" {efficiency(a.cpus_per_actor, a.parallel_efficiency):.2f} at {a.cpus_per_actor:g}; {a.cpu_instance} vCPU"
            f" {_yield_basis(p, a.cpu_instance, a)}; {a.jobs_per_month} jobs/month;"
            f" start-up: head {a.head_startup_minutes:g} min, node {a.node_startup_minutes:g} min;"
            f" teardown {a.head_teardown_minutes:g} min (not measurable here);"
            f" {a.actor_memory_gb:g} GB per actor"
        ),
    ]
    g = first.gpu_measured
    if g is not None:
        out.append(
            f"measured (GPU): {g.scans_ok} ok scans in {', '.join(g.summaries)}: {g.gpu_seconds_per_scan:.1f}"
            f" GPU-s/scan"
        )
    return out


def _column_header(reports: list[CostReport]) -> str:
    """The table's header: a quantity and a USD column per monthly volume."""
    cols = "".join(
        f" {'quantity @' + _volume(r.assumptions.scans_per_month):>27} "
        f"{'USD @' + _volume(r.assumptions.scans_per_month):>10}"
        for r in reports
    )
    return f"{'line item':<44} {'price':>10}{cols}  basis (at {_volume(reports[0].assumptions.scans_per_month)}/month)"


def _row(lines: list[LineItem | None]) -> str:
    """One line item across the volumes; a volume without it (None) gets '-' cells."""
    line = next(x for x in lines if x is not None)
    cells = "".join(
        f" {x.quantity:>13,.2f} {x.unit:<13} {x.monthly_usd:>10,.2f}"
        if x is not None
        else f" {'-':>13} {'':<13} {'-':>10}"
        for x in lines
    )
    price = ("-$" if line.unit_price < 0 else "$") + format(abs(line.unit_price), ".4g")
    return f"{line.item[:44]:<44} {price:>10}{cells}  {line.basis}"


def _total_row(label: str, reports: list[CostReport], totals: list[float | None]) -> str:
    """A total across the volumes, with its USD per 1,000 scans; a volume without it (None) gets '-' cells."""
    cells = "".join(
        f" {'per 1k scans ' + format(r.per_1k(t), ',.3f'):>27} {t:>10,.2f}"
        if t is not None
        else f" {'-':>27} {'-':>10}"
        for r, t in zip(reports, totals)
    )
    return f"{label:<44} {'':>10}{cells}"


def _batch_section(reports: list[CostReport], header: str, rule: str) -> list[str]:
    """Each compute alternative with its head and nodes per job, the lines they share, the totals per alternative."""
    first = reports[0]
    out = ["", "BATCH (job-scoped cluster: head and workers exist only while a job runs)", header, rule]
    for option in first.compute:
        if first.compute[option] is None:
            out.append(f"compute: {option:<35} not measured (pass a summary of such a run)")
            continue
        out.append(_row([r.compute[option] for r in reports]))
        out.append(_row([r.head[option] for r in reports]))
        nodes = ", ".join(
            f"{r.plan[option]['nodes_per_job']} @{_volume(r.assumptions.scans_per_month)}"
            f" (--max-actors {r.plan[option]['nodes_per_job'] * r.plan[option]['actors_per_node']})"
            for r in reports
        )
        out.append(f"{'':<44} {'':>10}  nodes per job: {nodes} ({first.plan[option]['nodes_basis']})")
    out.append(rule)
    out += [_row([r.shared[i] for r in reports]) for i in range(len(first.shared))]
    out.append(rule)
    for option in first.compute:
        if first.total(option) is not None:
            out.append(_total_row(f"batch total with {option}", reports, [r.total(option) for r in reports]))
    return out


def _serve_section(reports: list[CostReport], rule: str) -> list[str]:
    """The always-on endpoint: its own lines and total, apart from the batch bill."""
    out = [
        "",
        (
            "SERVE (always-on endpoint: small head 730 h + replicas from zero; its own deployment, not in"
            " the batch total)"
        ),
        rule,
    ]
    out += [_row([r.serve[i] for r in reports]) for i in range(len(reports[0].serve))]
    out.append(f"{'serve total':<44} {'':>10}" + "".join(f" {'':>27} {r.serve_total():>10,.2f}" for r in reports))
    return out


def _inputs_section(reports: list[CostReport], rule: str) -> list[str]:
    """The input bucket's opt-in rule, when priced: the user's own bucket, so its saving stands beside the total."""
    first = reports[0]
    if not first.inputs:
        return []
    out = [
        "",
        (
            "INPUTS (your input bucket, not in the batch total): the opt-in Glacier IR rule,"
            f" jobs/setup_aws.py --input-glacier-days {first.assumptions.input_glacier_days}"
        ),
        rule,
    ]
    out += [_row([r.inputs[i] for r in reports]) for i in range(len(first.inputs))]
    out.append(
        f"{'input rule: saving a month':<44} {'':>10}"
        + "".join(f" {'':>27} {r.input_saving():>10,.2f}" for r in reports)
        + "  = -(storage moved + transitions + retrievals)"
    )
    return out


def format_report(reports: CostReport | list[CostReport]) -> str:
    """The table a user reads: one column pair (quantity, USD/month) per monthly volume; compute alternatives
    with the batch head their job hours need, the shared lines, the batch totals, then the Serve endpoint."""
    reports = [reports] if isinstance(reports, CostReport) else reports
    p = reports[0].prices
    header = _column_header(reports)
    rule = "-" * len(header)
    out = _preamble(reports)
    out += _batch_section(reports, header, rule)
    out += _serve_section(reports, rule)
    out += _inputs_section(reports, rule)
    out.append(f"'per 1k': USD per 1,000 scans. Prices: {p.get('source', '')}")
    out += [f"Price assumed, not listed: {key}: {why}" for key, why in (p.get("assumed") or {}).items()]
    return "\n".join(out)


def report_dict(report: CostReport) -> dict:
    """The same figures as JSON-ready data."""

    def line(item: LineItem | None, per_scan: bool = True) -> dict | None:
        if item is None:
            return None
        out = {**asdict(item), "monthly_usd": item.monthly_usd}
        if per_scan:
            out["per_1k_scans_usd"] = report.per_1k(item.monthly_usd)
        return out

    a = report.assumptions
    return {
        "scans_per_month": a.scans_per_month,
        "assumptions": {
            **asdict(a),
            "efficiency_at_cpus_per_actor": efficiency(a.cpus_per_actor, a.parallel_efficiency),
        },
        "measured": asdict(report.measured),
        "gpu_measured": asdict(report.gpu_measured) if report.gpu_measured else None,
        "prices": {k: report.prices.get(k) for k in ("taken", "region", "currency", "source")},
        "compute": {k: line(v) for k, v in report.compute.items()},
        "head": {k: line(v) for k, v in report.head.items()},
        "plan": report.plan,
        "shared": [line(s) for s in report.shared],
        "totals": {k: report.total(k) for k in report.compute},
        "per_1k_scans": {
            k: (None if t is None else report.per_1k(t)) for k, t in ((k, report.total(k)) for k in report.compute)
        },
        "serve": {"lines": [line(s, per_scan=False) for s in report.serve], "total": report.serve_total()},
        "inputs": {"lines": [line(s) for s in report.inputs], "saving": report.input_saving()},
    }


# ----------------------------------------------------------------------------------------------- command


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What is priced: the summaries measured, the monthly volumes, the price table."""
    p.add_argument(
        "--summary",
        action="append",
        required=True,
        metavar="URI",
        help="summary.parquet of a finished CPU run (repeatable)",
    )
    p.add_argument(
        "--gpu-summary",
        action="append",
        default=[],
        metavar="URI",
        help="summary.parquet of a run on the GPU workers (repeatable); without it GPU is not priced",
    )
    p.add_argument("--scans-per-month", type=int, required=True)
    p.add_argument(
        "--compare-scans-per-month",
        type=int,
        default=COMPARE_SCANS_PER_MONTH,
        metavar="N",
        help=f"a second column at this volume (default {COMPARE_SCANS_PER_MONTH:,}; 0: none)",
    )
    p.add_argument("--prices", help=f"JSON overriding keys of {PRICES_FILE.name} (local or s3://)")


def _add_stand_in_arguments(p: argparse.ArgumentParser) -> None:
    """Figures a summary written by an older batch job does not record, or records for masks unlike real ones."""
    p.add_argument(
        "--measured-actor-cpus",
        type=float,
        help="CPUs the measured run's actors had, for a summary that does not record it",
    )
    p.add_argument("--mask-mb", type=float, help="with --passport-kb: sizes for a summary without bytes_written")
    p.add_argument("--passport-kb", type=float)
    p.add_argument("--item-kb", type=float, help="DynamoDB item size for a summary without store_item_bytes")


def _add_deployment_arguments(p: argparse.ArgumentParser, d: Assumptions) -> None:
    """The instances (cluster.yaml's by default), how often jobs run, how long results are kept, Serve's load."""
    for name in ("cpu_instance", "gpu_instance", "head_instance", "serve_head_instance"):
        p.add_argument("--" + name.replace("_", "-"), default=getattr(d, name))
    for name in ("jobs_per_month", "retention_months", "serve_requests_per_month", "serve_scale_ups_per_month"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))


def _add_input_rule_arguments(p: argparse.ArgumentParser, d: Assumptions) -> None:
    """The input bucket's opt-in Glacier IR rule: priced in its own section only when asked for."""
    p.add_argument(
        "--input-glacier-days",
        type=int,
        metavar="N",
        help="price the input bucket's opt-in rule (jobs/setup_aws.py --input-glacier-days N) in its own section;"
        " needs --input-mb",
    )
    p.add_argument("--input-mb", type=float, help="one scan's input as stored, MB (a DICOM series: all its files)")
    p.add_argument("--input-objects-per-scan", type=float, default=d.input_objects_per_scan)
    p.add_argument("--input-retention-months", type=int, help="default: --retention-months")
    p.add_argument("--input-reread-fraction", type=float, default=d.input_reread_fraction)


def _add_node_arguments(p: argparse.ArgumentParser, d: Assumptions) -> None:
    """The assumptions about a worker node and a job on it that no summary can measure."""
    p.add_argument(
        "--nodes-per-job",
        type=int,
        default=None,
        help="worker nodes a job runs on (default: the cheapest count, at most cluster.yaml's max workers; the"
        " report prints the --max-actors that gives it)",
    )
    for name in (
        "cpus_per_actor",
        "actor_memory_gb",
        "parallel_efficiency",
        "node_startup_minutes",
        "head_startup_minutes",
        "head_teardown_minutes",
        "ebs_gb_per_node",
        "egress_fraction",
        "log_kb_per_scan",
        "serve_idle_minutes",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument(
        "--vcpu-yield",
        type=float,
        default=None,
        help=f"what a worker vCPU does in measured cores (default: {VCPU_YIELD_CORE:g} where a vCPU is a core,"
        f" {VCPU_YIELD_SMT:g} where it is a hyperthread)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``ray-app cost``'s options, in the order --help lists them; the defaults are :class:`Assumptions`'."""
    d = Assumptions(scans_per_month=0)
    _add_run_arguments(p)
    _add_stand_in_arguments(p)
    _add_deployment_arguments(p, d)
    _add_input_rule_arguments(p, d)
    _add_node_arguments(p, d)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    fields = Assumptions.__dataclass_fields__
    assumptions = Assumptions(**{k: v for k, v in vars(args).items() if k in fields})
    volumes = [args.scans_per_month]
    if args.compare_scans_per_month and args.compare_scans_per_month != args.scans_per_month:
        volumes.append(args.compare_scans_per_month)
    try:
        measured = measure(args.summary, args.measured_actor_cpus)
        gpu = measure(args.gpu_summary, args.measured_actor_cpus) if args.gpu_summary else None
        reports = estimate_at(volumes, measured, assumptions, load_prices(args.prices), gpu)
    except CostInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**report_dict(reports[0]), "other_volumes": [report_dict(r) for r in reports[1:]]}, indent=1))
    else:
        print(format_report(reports))
    return 0
