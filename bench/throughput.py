"""Scans per hour: ``ray-app batch`` with its defaults against vanilla ``totalsegmentator()`` in a warm loop, on
the same files and weights, and whether their masks are identical.

    PYTHONPATH=. .venv/bin/python bench/throughput.py                         # 4 CTs 512x512x200, realistic net
    PYTHONPATH=. .venv/bin/python bench/throughput.py --scans 1 --shape 96,96,40 --weights phantom   # smoke run

Needs an otherwise idle machine: both sides use every core. Vanilla runs first in its own process: one call to
warm it up (imports, first-call costs; not counted), then one call per file, timed from the first to the last.
The batch job then runs as the plain command a user types (``ray-app batch --manifest ... --output ...``), its
wall time from the command's start to its end (Ray start and model loading included). Figures go to
``bench/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DEFAULT_RANDOM_WEIGHTS, PHANTOM_WEIGHTS  # noqa: E402


def make_cts(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    """``n`` phantom bodies at 0.78x0.78x1.5 mm, as scanners write them (int16 .nii.gz)."""
    import nibabel as nib

    from ray_app.demo.phantom import make_phantom

    paths = []
    for i in range(n):
        path = folder / f"ct{i}.nii.gz"
        if not path.exists():
            affine = np.diag([-0.78, -0.78, 1.5, 1.0])
            ct, _ = make_phantom(7000 + i, shape=shape, affine=affine)
            nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), affine), path)
        paths.append(path)
    return paths


def vanilla(paths: list[str], masks: str) -> dict:
    """In a child process: TotalSegmentator's API in a warm loop."""
    import nibabel as nib
    from totalsegmentator.python_api import totalsegmentator

    from ray_app.core.totalseg import disable_usage_stats

    disable_usage_stats()
    totalsegmentator(nib.load(paths[0]), None, fast=True, device="cpu", quiet=True)  # warm-up, not counted
    t = time.perf_counter()
    for i, path in enumerate(paths):
        out = totalsegmentator(nib.load(path), None, fast=True, device="cpu", quiet=True)
        np.save(Path(masks) / f"{i}.npy", np.asanyarray(out.dataobj).astype(np.uint8))
    return {"wall_s": time.perf_counter() - t}


def batch(paths: list[Path], work: Path, env: dict) -> dict:
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scan_id", "uri"])
        writer.writerows([f"ct{i}", str(p)] for i, p in enumerate(paths))
    out = work / "batch-out"
    cmd = [str(Path(sys.executable).with_name("ray-app")), "batch", "--manifest", str(manifest), "--output", str(out)]
    t = time.perf_counter()
    proc = subprocess.run([*cmd, "--force"], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"ray-app batch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return {"wall_s": wall, "out": str(out), "log_tail": proc.stdout[-1500:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scans", type=int, default=4)
    p.add_argument("--shape", default="512,512,200")
    p.add_argument("--weights", default="random", help="'random' (realistic architecture), 'phantom', or a path")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ray_app_bench_throughput"))
    p.add_argument("--out", default=str(HERE / "results" / "throughput.json"))
    p.add_argument("--vanilla-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vanilla_child:
        print(json.dumps(vanilla(json.loads(args.vanilla_child[0]), args.vanilla_child[1])))
        return
    import nibabel as nib

    weights = {"phantom": PHANTOM_WEIGHTS, "random": DEFAULT_RANDOM_WEIGHTS}.get(args.weights, Path(args.weights))
    if args.weights == "random" and not (weights / "Dataset297_TotalSegmentator_total_3mm_1559subj").exists():
        subprocess.run([sys.executable, str(HERE / "make_random_weights.py"), str(weights)], check=True)
    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(args.work) / "x".join(map(str, shape))
    work.mkdir(parents=True, exist_ok=True)
    paths = make_cts(work, args.scans, shape)
    env = {
        **os.environ,
        "TOTALSEG_WEIGHTS_PATH": str(weights),
        "TOTALSEG_HOME_DIR": tempfile.mkdtemp(prefix="bench-totalseg-home-"),
    }
    masks = Path(tempfile.mkdtemp(prefix="bench-vanilla-masks-"))
    cmd = [sys.executable, __file__, "--vanilla-child", json.dumps([str(x) for x in paths]), str(masks)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    van = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = batch(paths, work, env)
    identical = [
        np.array_equal(
            np.load(masks / f"{i}.npy"),
            np.asanyarray(nib.load(Path(ours["out"]) / f"ct{i}" / "total_fast" / "mask.nii.gz").dataobj),
        )
        for i in range(len(paths))
    ]
    result = {
        "scans": len(paths),
        "shape": list(shape),
        "weights": args.weights,
        "machine": f"{os.cpu_count()} CPUs",
        "load_average_at_end": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "vanilla_wall_s": van["wall_s"],
        "batch_wall_s": ours["wall_s"],
        "batch_over_vanilla_throughput": van["wall_s"] / ours["wall_s"],
        "masks_identical": identical,
        "batch_log_tail": ours["log_tail"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"{len(paths)} x {shape}: vanilla warm loop {van['wall_s']:.0f} s, ray-app batch (defaults) "
        f"{ours['wall_s']:.0f} s: {result['batch_over_vanilla_throughput']:.2f}x vanilla's throughput; "
        f"masks identical: {all(identical)}"
    )


if __name__ == "__main__":
    main()
