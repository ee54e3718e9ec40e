"""Parallel efficiency of one network tile at 1 and 2 torch threads: the figure ``ray-app cost`` uses to move
CPU-seconds measured with one actor size onto another (``ray_app/ops/cost.py``, ``PARALLEL_EFFICIENCY``).

    PYTHONPATH=. .venv/bin/python bench/thread_scaling.py                 # realistic 3 mm network, random weights
    PYTHONPATH=. .venv/bin/python bench/thread_scaling.py --net phantom   # the phantom model the tests run
    PYTHONPATH=. .venv/bin/python bench/thread_scaling.py --scan synthetic  # a whole 512x512x300 CT, warm Segmenter

Each thread count runs ``--repeats`` forwards of one patch-sized tile (fp32, no grad), interleaved 1, 2, 1, 2, ...
so that a burst of load from other processes hits both alike. Efficiency at k threads = t(1) / (k x t(k)): 1.0
means k threads finish k times sooner. Reported from the fastest run of each (load from other processes only ever
adds time, so the minimum is the best estimate of an idle machine) and from the medians. ``--scan synthetic``
times what a segmentation actor does per scan instead (resampling, every tile, the logits' aggregation and
argmax, resampling back: ``Segmenter.segment``) on bench/run.py's synthetic 512x512x300 CT with the realistic
network's random weights (made in bench/run.py's weights folder when absent).
Writes ``bench/results/thread-scaling-<net>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def network(name: str):
    from ray_app.demo import made_weights as mw

    if name == "realistic":
        intensity = mw.IntensityProperties(mean=0.0, std=1.0, percentile_00_5=-1000.0, percentile_99_5=1000.0)
        plans = mw.make_plans(297, mw.REALISTIC_3MM, intensity, median_shape=(300, 256, 256))
        dataset = mw.make_dataset_json(297, 1559)
    else:
        folder = next((REPO / "ray_app" / "demo" / "phantom_weights").glob("Dataset297_*/*__3d_fullres"))
        plans = json.loads((folder / "plans.json").read_text())
        dataset = json.loads((folder / "dataset.json").read_text())
    net = mw.build_network(plans, dataset, 297).eval()
    return net, plans["configurations"]["3d_fullres"]["patch_size"]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", choices=("realistic", "phantom"), default="realistic")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scan", choices=("tile", "synthetic"), default="tile")
    args = parser.parse_args()
    if args.scan == "synthetic":
        return whole_scan(args)

    load_at_start = os.getloadavg()[0]
    net, patch = network(args.net)
    tile = torch.randn(1, 1, *patch)
    times: dict[int, list[float]] = {k: [] for k in args.threads}
    cpu: dict[int, list[float]] = {k: [] for k in args.threads}
    with torch.no_grad():
        torch.set_num_threads(max(args.threads))
        net(tile)  # warm-up: allocator, oneDNN primitive cache
        for _ in range(args.repeats):
            for k in args.threads:
                torch.set_num_threads(k)
                t, c = time.perf_counter(), time.process_time()
                net(tile)
                times[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    median = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    k0 = min(args.threads)
    result = {
        "net": args.net,
        "patch_size": patch,
        "machine": f"{os.uname().machine}, {len(os.sched_getaffinity(0))} CPUs, "
        f"load {os.getloadavg()[0]:.2f} at the end",
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"PYTHONPATH=. python bench/thread_scaling.py --net {args.net} --repeats {args.repeats}",
        "load_at_start": load_at_start,
        "seconds": {str(k): v for k, v in times.items()},
        # CPU-seconds the process used per tile: what k threads cost in core time, whatever the wall clock did
        "cpu_seconds": {str(k): v for k, v in cpu.items()},
        "min_s": {str(k): v for k, v in fastest.items()},
        "median_s": {str(k): v for k, v in median.items()},
        "efficiency": {str(k): fastest[k0] * k0 / (k * fastest[k]) for k in args.threads},
        "efficiency_of_medians": {str(k): median[k0] * k0 / (k * median[k]) for k in args.threads},
    }
    out = HERE / "results" / f"thread-scaling-{args.net}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def whole_scan(args) -> None:
    import subprocess
    import sys

    sys.path.insert(0, str(HERE))
    from run import DEFAULT_RANDOM_WEIGHTS, synthetic_ct  # bench/run.py

    if not (DEFAULT_RANDOM_WEIGHTS / "Dataset297_TotalSegmentator_total_3mm_1559subj").is_dir():
        subprocess.run([sys.executable, str(HERE / "make_random_weights.py"), str(DEFAULT_RANDOM_WEIGHTS)], check=True)
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(DEFAULT_RANDOM_WEIGHTS)
    import nibabel as nib
    import torch

    from ray_app.core.segmenter import Segmenter
    from ray_app.settings import Settings

    load_at_start = os.getloadavg()[0]
    img = nib.load(synthetic_ct())
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    seg = Segmenter(fast=True, device="cpu", num_threads=max(args.threads), settings=Settings())
    times: dict[int, list[float]] = {k: [] for k in args.threads}
    cpu: dict[int, list[float]] = {k: [] for k in args.threads}
    stages: dict[int, list[dict]] = {k: [] for k in args.threads}
    for _ in range(args.repeats):
        for k in args.threads:
            torch.set_num_threads(k)
            t, c = time.perf_counter(), time.process_time()
            result = seg.segment(img)
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
            stages[k].append({n: round(v, 2) for n, v in result.timings.items()})
    fastest = {k: min(v) for k, v in times.items()}
    k0 = min(args.threads)
    result = {
        "scan": "synthetic 512x512x300 CT at 0.78x0.78x1.5 mm (bench/run.py), realistic 3 mm network, random weights",
        "machine": f"{os.uname().machine}, {len(os.sched_getaffinity(0))} CPUs",
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"PYTHONPATH=. python bench/thread_scaling.py --scan synthetic --repeats {args.repeats}",
        "load_at_start": load_at_start,
        "load_at_end": os.getloadavg()[0],
        "seconds": {str(k): v for k, v in times.items()},
        "cpu_seconds": {str(k): v for k, v in cpu.items()},
        "stages": {str(k): v for k, v in stages.items()},
        "efficiency": {str(k): fastest[k0] * k0 / (k * fastest[k]) for k in args.threads},
        "efficiency_of_cpu_seconds": {str(k): min(cpu[k0]) / min(cpu[k]) for k in args.threads},
    }
    out = HERE / "results" / "thread-scaling-synthetic-scan.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
