"""Memory of the batch job over a long manifest (prints figures; not part of the test suite).

Runs the real job (``run_batch``) on a local Ray over a manifest of a few hundred small phantom scans (a pool of
distinct files, each listed under many scan ids) into a local folder with the embedded SQLite store, and samples,
once a second, the driver's resident memory and the cluster's object-store use. Streaming execution should keep
both flat: the driver holds one summary row per scan, the object store only the scans in flight.

    python bench/batch_memory.py --scans 300
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def small_scan(seed: int) -> bytes:
    import nibabel as nib
    import numpy as np

    from ray_app.demo.phantom import make_phantom

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-96.0, -96.0, -72.0)  # wide enough to hold air around the body (a Hounsfield check)
    ct = make_phantom(seed, affine=affine, shape=(64, 64, 48))[0]
    return gzip.compress(nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), ct.affine).to_bytes(), 1)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def object_store_mib() -> float:
    import ray
    from ray._private.internal_api import memory_summary

    # This job's cluster by address: without it Ray refuses when another local cluster runs on the machine.
    address = ray.get_runtime_context().gcs_address
    match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=address, stats_only=True))
    return float(match.group(1)) if match else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=300)
    p.add_argument("--distinct", type=int, default=12, help="distinct phantom files behind the scan ids")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out", help="working folder (default: a temp dir)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOTALSEG_WEIGHTS_PATH", str(REPO / "ray_app" / "demo" / "phantom_weights"))
    os.environ.setdefault("TOTALSEG_HOME_DIR", tempfile.mkdtemp(prefix="totalseg-home-"))
    sys.path.insert(0, str(REPO))
    import ray

    from ray_app.adapters.batch import BatchConfig, init_ray, run_batch
    from ray_app.core.totalseg import disable_usage_stats

    disable_usage_stats()
    work = Path(args.out or tempfile.mkdtemp(prefix="batch-memory-"))
    (work / "in").mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(args.distinct):
        path = work / "in" / f"phantom-{i:02d}.nii.gz"
        path.write_bytes(small_scan(300 + i))
        files.append(str(path))
    manifest = work / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"scan_id": f"scan-{i:04d}", "uri": files[i % len(files)]}) + "\n" for i in range(args.scans)
        )
    )
    init_ray(num_cpus=args.cpus)
    print(
        f"{args.scans} scans ({args.distinct} distinct files) -> {work / 'out'}; driver RSS after ray.init "
        f"{rss_mib():.0f} MiB",
        flush=True,
    )

    samples: list[tuple[float, float, float]] = []
    done = threading.Event()
    start = time.monotonic()

    def sampler() -> None:
        while not done.is_set():
            samples.append((time.monotonic() - start, rss_mib(), object_store_mib()))
            done.wait(1.0)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    report = run_batch(
        BatchConfig(
            manifest=str(manifest),
            output=str(work / "out"),
            job_id="batch-memory",
            max_actors=args.actors,
            min_actors=args.actors,
        )
    )
    done.set()
    thread.join()
    wall = time.monotonic() - start

    rss = [r for _, r, _ in samples]
    store = [s for _, _, s in samples]
    first_half = [r for t, r, _ in samples if t < wall / 2]
    second_half = [r for t, r, _ in samples if t >= wall / 2]
    figures = {
        "scans": args.scans,
        "ok": report.succeeded,
        "failed": report.failed,
        "wall_s": round(wall, 1),
        "scans_per_min": round(60 * args.scans / wall, 1),
        "driver_rss_mib": {
            "start": round(rss[0]),
            "max": round(max(rss)),
            "end": round(rss[-1]),
            "max_first_half": round(max(first_half)),
            "max_second_half": round(max(second_half)),
        },
        "object_store_mib": {"max": max(store), "mean": round(sum(store) / len(store), 1)},
        "samples": len(samples),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    ray.shutdown()
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
