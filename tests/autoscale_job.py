"""Driver for the autoscaling test (run as its own process, so the test process never joins this cluster).

``python tests/autoscale_job.py ADDRESS OUT.json``: a Ray Data job whose actor pools (the batch job's pattern)
need the ``spot_cpu`` and then the ``spot_gpu`` worker types, which the head alone does not have. A thread
samples the alive nodes the whole time; after the job it waits for the cluster to return to the head alone.
Writes the trace and where each row ran as JSON.
"""

import json
import sys
import threading
import time

import ray
import ray.data
from ray.data import ActorPoolStrategy

LABELS = ("spot_cpu", "spot_gpu")


class OnCpuWorker:
    """An actor like the batch job's segmentation actor, pinned to the Spot CPU kind by its custom resource."""

    def __call__(self, batch):
        batch["cpu_node"] = [ray.get_runtime_context().get_node_id()] * len(batch["id"])
        return batch


class OnGpuWorker:
    def __call__(self, batch):
        batch["gpu_node"] = [ray.get_runtime_context().get_node_id()] * len(batch["id"])
        batch["gpu_ids"] = [len(ray.get_gpu_ids())] * len(batch["id"])
        return batch


def workers() -> dict[str, list[str]]:
    """Alive worker nodes by label."""
    alive = [n for n in ray.nodes() if n["Alive"]]
    return {label: sorted(n["NodeID"] for n in alive if label in n["Resources"]) for label in LABELS}


def main(address: str, out_path: str) -> None:
    ray.init(address=address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.monotonic()
    trace: list[dict] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            trace.append({"t": round(time.monotonic() - start, 1), **workers()})
            time.sleep(0.5)

    trace.append({"t": 0.0, **workers()})
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ds = (
        ray.data.range(8, override_num_blocks=4)
        .map_batches(
            OnCpuWorker,
            compute=ActorPoolStrategy(min_size=1, max_size=1),
            batch_size=2,
            num_cpus=1,
            resources={"spot_cpu": 1},
        )
        .map_batches(
            OnGpuWorker,
            compute=ActorPoolStrategy(min_size=1, max_size=1),
            batch_size=2,
            num_cpus=0,
            num_gpus=1,
            resources={"spot_gpu": 1},
        )
    )
    rows = ds.take_all()
    job_s = time.monotonic() - start
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(workers().values()):
        time.sleep(1)
    done.set()
    sampler.join()
    trace.append({"t": round(time.monotonic() - start, 1), **workers()})
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "trace": trace, "job_s": job_s}, f, default=lambda v: v.item())  # numpy scalars


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
