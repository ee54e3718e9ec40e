"""The batch job under faults, on the moto server (S3 + DynamoDB) and a local Ray: a segmentation actor killed
as a Spot loss kills it, the driver killed and the job re-run, S3 and DynamoDB throttling and 5xx answers
injected at the wire, and a scan that exhausts its actor's memory.

After each, every scan of the manifest has exactly one passport and one mask (or, for the scan that could not
fit, one failure record): nothing lost, nothing done twice.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import nibabel as nib
import numpy as np
import pytest

from ray_app.adapters import cli
from ray_app.adapters.batch import BatchConfig, run_batch
from ray_app.storage.sinks import create_table, open_passport_store, read_summary
from tests._fake_cluster import fake_cluster, node_processes
from tests._scan_factory import small_phantom
from tests.faultproxy import FAULTS, FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "total_fast"
RAY_APP = str(Path(sys.executable).with_name("ray-app"))


class Job:
    """A bucket with ``n`` scans and a CSV manifest, and a fresh passport table."""

    def __init__(self, n: int):
        self.s3 = boto3.client("s3")
        self.bucket = f"rel-{uuid.uuid4().hex[:10]}"
        self.s3.create_bucket(Bucket=self.bucket)
        self.table = f"passports-{uuid.uuid4().hex[:10]}"
        create_table(self.table)
        self.ids = [f"scan-{i:02d}" for i in range(n)]
        lines = ["scan_id,uri"]
        for i, sid in enumerate(self.ids):
            self.s3.put_object(Bucket=self.bucket, Key=f"in/{sid}.nii.gz", Body=small_phantom(100 + i))
            lines.append(f"{sid},s3://{self.bucket}/in/{sid}.nii.gz")
        self.s3.put_object(Bucket=self.bucket, Key="in/manifest.csv", Body="\n".join(lines).encode() + b"\n")
        self.store = open_passport_store(f"dynamodb://{self.table}")

    def argv(self, job_id: str) -> list[str]:
        return [
            "batch",
            "--manifest",
            f"s3://{self.bucket}/in/manifest.csv",
            "--output",
            f"s3://{self.bucket}/out",
            "--table",
            self.table,
            "--job-id",
            job_id,
            "--max-actors",
            "1",
        ]

    def config(self, job_id: str) -> BatchConfig:
        return BatchConfig(
            manifest=f"s3://{self.bucket}/in/manifest.csv",
            output=f"s3://{self.bucket}/out",
            passports=f"dynamodb://{self.table}",
            job_id=job_id,
            max_actors=1,
        )

    def keys(self) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="out/")
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def items(self) -> list[dict]:
        pages = boto3.client("dynamodb").get_paginator("scan").paginate(TableName=self.table)
        return [item for page in pages for item in page["Items"]]

    def done(self, job_id: str) -> dict[str, str]:
        return {d["scan_id"]: d["created_at"] for d in self.store.list_by_job(job_id)}

    def assert_exactly_one_result_each(self) -> None:
        """One ok passport per scan in DynamoDB, one mask and one passport.json per scan in S3, nothing else."""
        items = self.items()
        assert sorted(i["scan_id"]["S"] for i in items) == self.ids
        assert {i["status"]["S"] for i in items} == {"ok"}
        keys = [k for k in self.keys() if not k.startswith("out/_jobs/")]
        assert sorted(keys) == sorted(
            f"out/{sid}/{MODEL}/{name}" for sid in self.ids for name in ("mask.nii.gz", "passport.json")
        )


def _wait(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def _segment_actors() -> dict[str, dict]:
    """Ray Data's pool actors that run SegmentActor, from the GCS actor table (ActorID -> entry with Pid)."""
    import ray._private.state

    return {aid: a for aid, a in ray._private.state.actors().items() if "MapWorker" in a["ActorClassName"]}


class InThread:
    """Run the job in a thread (the driver stays this process) so the test can act while it runs."""

    def __init__(self, fn):
        self.result, self.error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = repr(exc)

    def join(self, timeout: float):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the job did not finish"
        assert self.error is None, self.error
        return self.result


def test_a_killed_segmentation_actor_loses_no_scan(moto_server, ray_cluster):
    job = Job(5)
    before = set(_segment_actors())
    run = InThread(lambda: run_batch(job.config("kill-actor")))
    _wait(lambda: job.done("kill-actor"), 180, "the first passport")

    def busy_actor():
        alive = {aid: a for aid, a in _segment_actors().items() if aid not in before and a["State"] == "ALIVE"}
        return next(iter(alive.items()), None)

    actor_id, actor = _wait(busy_actor, 30, "a live segmentation actor")
    done_at_kill = len(job.done("kill-actor"))
    assert done_at_kill < len(job.ids), "the job ended before the actor could be killed"
    os.kill(actor["Pid"], signal.SIGKILL)
    report = run.join(240)

    assert _segment_actors()[actor_id]["NumRestarts"] >= 1, "Ray restarted the killed actor"
    assert sorted(r["scan_id"] for r in report.rows) == job.ids, "exactly one summary row per scan"
    assert {r["status"] for r in report.rows} == {"ok"}
    job.assert_exactly_one_result_each()
    print(f"actor pid {actor['Pid']} killed after {done_at_kill}/{len(job.ids)} scans; all {len(job.ids)} done once")


SEGMENT_ACTOR_TITLE = "ray::MapWorker(MapBatches(SegmentActor))"


class ActorKiller:
    """SIGKILL the segmentation actor's process whenever it has been segmenting for ``after`` seconds, as the
    kernel's OOM killer or a native crash would. Ray titles an actor worker
    ``ray::MapWorker(MapBatches(SegmentActor)).submit`` while it runs a batch (``....__init__`` while it loads the
    model, no suffix when idle), seen in /proc/PID/cmdline. The delay spares a delivery that only answers with a
    failure record (milliseconds), not one that segments (seconds)."""

    TITLE = f"{SEGMENT_ACTOR_TITLE}.submit".encode()

    def __init__(self, after: float = 0.5):
        self.after = after
        self.kills: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        busy_since: dict[int, float] = {}
        while not self._stop.is_set():
            busy = set()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    title = (entry / "cmdline").read_bytes().rstrip(b"\0")
                except OSError:
                    continue
                if title == self.TITLE:
                    pid = int(entry.name)
                    busy.add(pid)
                    since = busy_since.setdefault(pid, time.monotonic())
                    if time.monotonic() - since >= self.after and pid not in self.kills:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        self.kills.append(pid)
            busy_since = {pid: t for pid, t in busy_since.items() if pid in busy}
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join()


@pytest.mark.timeout(240)
def test_a_scan_that_kills_its_actor_every_time_fails_as_worker_lost_and_the_job_ends(moto_server, ray_cluster):
    """Ray Data alone re-delivers such a scan forever (its pool's max_task_retries=-1): the job hung. After
    ``max_task_retries`` (default 3) deaths, the next delivery answers with a failure record and the job exits 1."""
    job = Job(1)
    (sid,) = job.ids
    killer = ActorKiller()
    started = time.monotonic()
    try:
        code = cli.main(job.argv("killer"))
    finally:
        killer.stop()
    elapsed = time.monotonic() - started

    retries = BatchConfig(manifest="", output="").max_task_retries
    assert code == 1
    assert len(killer.kills) == retries + 1, f"one kill per try: {killer.kills}"
    items = job.items()
    assert [(i["scan_id"]["S"], i["status"]["S"]) for i in items] == [(sid, "failed")]
    doc = job.store.get(sid, MODEL)
    assert doc["error"]["code"] == "worker_lost" and f"died {retries + 1} times" in doc["error"]["message"]
    written = job.keys()
    assert [k for k in written if not k.startswith("out/_jobs/")] == [f"out/{sid}/{MODEL}/passport.json"], (
        "a failure passport.json, no mask"
    )

    summary = read_summary(f"s3://{job.bucket}/out/_jobs/killer/summary.parquet")
    assert [(r["scan_id"], r["status"], r["error_code"], r["mask_uri"]) for r in summary] == [
        (sid, "failed", "worker_lost", None)
    ]
    print(
        f"actor killed {len(killer.kills)} times (pids {killer.kills}); job ended in {elapsed:.1f} s with exit "
        f"code {code}: {doc['error']['message']}"
    )


@pytest.mark.timeout(480)
def test_a_worker_node_lost_mid_job_is_replaced_and_no_scan_is_lost_or_done_twice(
    moto_server, phantom_weights, tmp_path
):
    """A Spot reclaim on Ray's fake multinode cluster: the segmentation actor must run on a Spot CPU worker node
    (``--actor-resource spot_cpu=1``; the head takes the fetch and write tasks). Once the first passport lands,
    every process of the node hosting the actor is SIGKILLed (raylet, workers, agents: all carry the node's
    ``RAY_OVERRIDE_NODE_ID_FOR_TESTING``). The autoscaler brings a replacement node up (two nodes per type allowed:
    the dead one keeps its slot until it is declared unhealthy), Ray restarts the actor there and retries the
    scan it had in hand, and the job ends with exactly one passport and one mask per scan."""
    job = Job(6)
    with fake_cluster(tmp_path, head_cpus=2, max_workers_per_type=2) as cluster:
        log_path = tmp_path / "driver.log"
        started = time.monotonic()

        def at() -> float:
            return round(time.monotonic() - started, 1)

        with open(log_path, "wb") as log:
            driver = subprocess.Popen(
                [RAY_APP, *job.argv("node-loss"), "--actor-resource", "spot_cpu=1"],
                env=cluster["env"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait(lambda: job.done("node-loss") or driver.poll() is not None, 300, "the first passport")
            assert driver.poll() is None, log_path.read_text()[-3000:]
            t_first = at()

            def actor_node():
                return next(
                    (
                        (node, procs)
                        for node, procs in node_processes().items()
                        if any(t.startswith(SEGMENT_ACTOR_TITLE) for t in procs.values())
                    ),
                    None,
                )

            node, procs = _wait(actor_node, 30, "the segmentation actor's node")
            before = set(node_processes())
            done_at_kill = len(job.done("node-loss"))
            for pid in procs:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            t_kill = at()
            _wait(
                lambda: not any(pid in pids for pids in node_processes().values() for pid in procs),
                10,
                "the killed processes to exit",
                poll=0.1,
            )
            killed = sorted({t.split()[0].rsplit("/", 1)[-1] for t in procs.values()})
            assert done_at_kill < len(job.ids), "the job ended before the node could be killed"
            assert any("raylet" in t for t in procs.values()), f"the node's raylet was not found: {procs}"

            t_replacement = t_actor = None
            replacement = None
            while driver.poll() is None:
                assert at() < 400, "the job did not finish"
                nodes = node_processes()
                if t_replacement is None and any(
                    n not in before and any("raylet" in t for t in nodes[n].values()) for n in nodes
                ):
                    t_replacement = at()
                # The actor's new home: a node started for it, or a second worker the autoscaler had already
                # started before the kill (two per type are allowed); never the killed one.
                if t_actor is None:
                    replacement = next(
                        (
                            n
                            for n in nodes
                            if n != node and any(t.startswith(SEGMENT_ACTOR_TITLE) for t in nodes[n].values())
                        ),
                        None,
                    )
                    t_actor = at() if replacement else None
                time.sleep(0.5)
            t_done = at()
        finally:
            if driver.poll() is None:
                driver.kill()
            driver.wait()
        assert driver.returncode == 0, log_path.read_text()[-4000:]

    assert replacement is not None, "no other node ran the segmentation actor after its node was killed"
    job.assert_exactly_one_result_each()
    assert len(job.done("node-loss")) == len(job.ids)
    print(
        f"node loss timeline (s from submit): first passport {t_first}; node {node[-5:]} killed at {t_kill} "
        f"({len(procs)} processes: {', '.join(killed)}) after {done_at_kill}/{len(job.ids)} scans; replacement "
        f"node up at {t_replacement}; actor on node {replacement[-5:]} at {t_actor}; job done at {t_done}; "
        f"exactly one passport and one mask for each of the {len(job.ids)} scans"
    )


def test_a_killed_driver_then_a_rerun_finishes_the_rest_and_duplicates_nothing(moto_server, ray_cluster, tmp_path):
    import ray

    job = Job(6)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen([RAY_APP, *job.argv("driver-a")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: len(job.done("driver-a")) >= 2 or driver.poll() is not None, 240, "two passports")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    # The dead driver's actors and tasks go with it; only then is its record of finished scans final.
    _wait(lambda: not any(a["State"] == "ALIVE" for a in _segment_actors().values()), 60, "the driver's actors")
    time.sleep(2)
    done_a = job.done("driver-a")
    assert 0 < len(done_a) < len(job.ids), done_a

    assert cli.main(job.argv("driver-b")) == 0
    done_b = job.done("driver-b")
    assert set(done_a).isdisjoint(done_b), "a scan finished before the kill was done again"
    assert set(done_a) | set(done_b) == set(job.ids)
    assert {sid: job.store.get(sid, MODEL)["created_at"] for sid in done_a} == done_a
    job.assert_exactly_one_result_each()
    print(f"driver killed after {len(done_a)}/{len(job.ids)} scans; the re-run did the other {len(done_b)}")


def test_s3_and_dynamodb_throttling_and_5xx_are_retried_and_nothing_is_lost(moto_server):
    """The job runs as its own process with its own local Ray, so that every worker talks to AWS through the
    proxy; every third S3 request and every second DynamoDB request fails, in every way the proxy knows."""
    job = Job(5)
    with FaultProxy(moto_server, every={"s3": 3, "dynamodb": 2}) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        env.pop("RAY_ADDRESS", None)
        run = subprocess.run(
            [RAY_APP, *job.argv("throttled")], env=env, capture_output=True, text=True, timeout=280, check=False
        )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    kinds = {kind for service in FAULTS.values() for kind, _, _ in service}
    assert set(proxy.faults) == kinds, proxy.faults
    job.assert_exactly_one_result_each()
    assert len(job.done("throttled")) == len(job.ids)
    puts = [r for r in proxy.requests if r.method == "PUT" and "/out/" in r.path]
    assert len(puts) >= 2 * len(job.ids) and {r.sse for r in puts} == {"AES256"}
    print(
        f"{len(proxy.requests)} requests through the proxy, {sum(proxy.faults.values())} answered with a fault: "
        f"{dict(proxy.faults)}"
    )


def _oversized_scan() -> bytes:
    """512x512x1600 voxels at 0.8 mm (a 1.3 m scan): 840 MB as int16. Mostly air, so it compresses to a few MB."""
    data = np.full((512, 512, 1600), -1000, np.int16)
    data[100:412, 120:392, 50:1550] = 40
    data[240:270, 250:280, 50:1550] = 700
    affine = np.diag([0.8, 0.8, 0.8, 1.0])
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes(), compresslevel=1)


def test_a_scan_that_exhausts_its_actors_memory_fails_alone_with_a_failure_record(moto_server, ray_cluster, tmp_path):
    """The actor gets 5 GiB (``memory_per_actor``: a Ray reservation, enforced in the actor as RLIMIT_DATA, which
    counts heap and anonymous mappings, Ray's own included). Since the actor receives only the 3 mm grid, a
    512x512x800 scan needs 3-4 GiB there (a bare process with the fast model and 2 threads: fails at 3, fits at 4;
    in the actor it passed or failed by chance); the 1600-slice scan needs 6-7 GiB (fails at 6, fits at 7). It fails
    with torch's real allocation error in the real code path, and the same actor carries on with the others."""
    (tmp_path / "in").mkdir()
    rows = []
    for i, sid in enumerate(["small-1", "too-big", "small-2"]):
        path = tmp_path / "in" / f"{sid}.nii.gz"
        path.write_bytes(_oversized_scan() if sid == "too-big" else small_phantom(200 + i))
        rows.append({"scan_id": sid, "uri": str(path)})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = set(_segment_actors())
    out = tmp_path / "out"
    report = run_batch(
        BatchConfig(manifest=str(manifest), output=str(out), job_id="oom", max_actors=1, memory_per_actor=5 * 1024**3)
    )

    status = {r["scan_id"]: (r["status"], r.get("error_code")) for r in report.rows}
    assert status == {"small-1": ("ok", None), "too-big": ("failed", "out_of_memory"), "small-2": ("ok", None)}
    store = open_passport_store(f"sqlite:///{out / 'passports.sqlite'}")
    assert store.get("too-big", MODEL)["error"]["code"] == "out_of_memory"
    assert not (out / "too-big" / MODEL / "mask.nii.gz").exists()
    assert all((out / sid / MODEL / "mask.nii.gz").is_file() for sid in ("small-1", "small-2"))
    actors = {aid: a for aid, a in _segment_actors().items() if aid not in before}
    assert len(actors) == 1 and next(iter(actors.values()))["NumRestarts"] == 0, "the actor itself never died"
