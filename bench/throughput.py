"""Scans per hour: ``ray-app batch`` with its defaults against vanilla ``totalsegmentator()`` in a warm loop, on
the same files and weights, and whether their masks are identical: to vanilla's as it runs here (torch threads =
the machine's CPUs) and, when the job's actors have fewer threads, to vanilla's run as on a machine with the actor's
CPUs (a CPU forward's float sums depend on the thread count).

    PYTHONPATH=. .venv/bin/python bench/throughput.py                         # 4 CTs 512x512x200, realistic net
    PYTHONPATH=. .venv/bin/python bench/throughput.py --scans 1 --shape 96,96,40 --weights phantom   # smoke run

Needs an otherwise idle machine: both sides use every core. Vanilla runs first in its own process: one call to
warm it up (imports, first-call costs; not counted), then one call per file, timed from the first to the last.
The batch job then runs as the plain command a user types (``ray-app batch --manifest ... --output ...``), its
wall time from the command's start to its end (Ray start and model loading included). Figures go to
``bench/results/throughput.json``. This VM's speed drifts by about 10% over minutes (the same code measured
0.97x-1.05x in one day), so ``--repeats N`` alternates the two N times and reports each round and the median.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
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


def vanilla(paths: list[str], masks: str, threads: int) -> dict:
    """In a child process: TotalSegmentator's API in a warm loop. ``threads`` > 0 runs it as on a machine with
    that many CPUs (it sets torch's threads to ``multiprocessing.cpu_count()``): the masks to compare with an
    actor that has that many threads. Reports the thread count it set for its forward."""
    import multiprocessing

    import nibabel as nib
    import torch
    from totalsegmentator.python_api import totalsegmentator

    from ray_app.core.totalseg import disable_usage_stats

    if threads:
        multiprocessing.cpu_count = lambda: threads
    set_threads, seen = torch.set_num_threads, []

    def recording(n: int) -> None:  # TotalSegmentator restores the caller's count when it returns
        seen.append(n)
        set_threads(n)

    torch.set_num_threads = recording
    disable_usage_stats()
    totalsegmentator(nib.load(paths[0]), None, fast=True, device="cpu", quiet=True)  # warm-up, not counted
    t = time.perf_counter()
    for i, path in enumerate(paths):
        out = totalsegmentator(nib.load(path), None, fast=True, device="cpu", quiet=True)
        np.save(Path(masks) / f"{i}.npy", np.asanyarray(out.dataobj).astype(np.uint8))
    return {"wall_s": time.perf_counter() - t, "torch_threads": seen[0]}


def batch(paths: list[Path], work: Path, env: dict, options: list[str]) -> dict:
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scan_id", "uri"])
        writer.writerows([f"ct{i}", str(p)] for i, p in enumerate(paths))
    out = work / "batch-out"
    cmd = [str(Path(sys.executable).with_name("ray-app")), "batch", "--manifest", str(manifest), "--output", str(out)]
    t = time.perf_counter()
    proc = subprocess.run([*cmd, "--force", *options], env=env, capture_output=True, text=True, check=False)
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
    p.add_argument("--batch-options", default="", help="options added to ray-app batch, e.g. '--max-actors 1'")
    p.add_argument("--repeats", type=int, default=1, help="rounds of vanilla then batch, alternating")
    p.add_argument("--vanilla-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vanilla_child:
        paths, masks, threads = args.vanilla_child
        print(json.dumps(vanilla(json.loads(paths), masks, int(threads))))
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
    rounds = []
    for _ in range(args.repeats):
        van = run_vanilla(paths, masks, 0, env)
        ours = batch(paths, work, env, shlex.split(args.batch_options))
        rounds.append({"vanilla_wall_s": van["wall_s"], "batch_wall_s": ours["wall_s"]})
        print(f"round {len(rounds)}: vanilla {van['wall_s']:.0f} s, batch {ours['wall_s']:.0f} s", flush=True)
    ratio = float(np.median([r["vanilla_wall_s"] / r["batch_wall_s"] for r in rounds]))
    out = Path(ours["out"])
    actor_threads = json.loads((out / "ct0" / "total_fast" / "passport.json").read_text())["model"]["torch_threads"]

    def identical(folder: Path) -> list[bool]:
        return [
            np.array_equal(
                np.load(folder / f"{i}.npy"),
                np.asanyarray(nib.load(out / f"ct{i}" / "total_fast" / "mask.nii.gz").dataobj),
            )
            for i in range(len(paths))
        ]

    to_vanilla = identical(masks)
    same_threads = {"torch_threads": van["torch_threads"], "identical": to_vanilla}
    if actor_threads != van["torch_threads"]:  # vanilla again, as on a machine with the actor's CPUs
        again_masks = Path(tempfile.mkdtemp(prefix="bench-vanilla-masks-"))
        again = run_vanilla(paths, again_masks, actor_threads, env)
        same_threads = {"torch_threads": again["torch_threads"], "wall_s": again["wall_s"]}
        same_threads["identical"] = identical(again_masks)
    result = {
        "scans": len(paths),
        "shape": list(shape),
        "weights": args.weights,
        "machine": f"{os.cpu_count()} CPUs",
        "load_average_at_end": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "PYTHONPATH=. .venv/bin/python bench/throughput.py " + shlex.join(sys.argv[1:]),
        "vanilla_wall_s": float(np.median([r["vanilla_wall_s"] for r in rounds])),
        "batch_wall_s": float(np.median([r["batch_wall_s"] for r in rounds])),
        "batch_over_vanilla_throughput": ratio,
        "rounds": rounds,
        "vanilla_torch_threads": van["torch_threads"],
        "actor_torch_threads": actor_threads,
        "masks_identical": to_vanilla,
        "vanilla_at_actor_threads": same_threads,
        "batch_log_tail": ours["log_tail"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"{len(paths)} x {shape}, median of {len(rounds)}: vanilla warm loop {result['vanilla_wall_s']:.0f} s, "
        f"ray-app batch ({args.batch_options or 'defaults'}) "
        f"{result['batch_wall_s']:.0f} s: {ratio:.2f}x vanilla's throughput; "
        f"masks identical: {all(result['masks_identical'])}; to vanilla at the actor's {actor_threads} torch "
        f"thread(s): {all(same_threads['identical'])}"
    )


def run_vanilla(paths: list[Path], masks: Path, threads: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--vanilla-child", json.dumps([str(x) for x in paths]), str(masks), str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
