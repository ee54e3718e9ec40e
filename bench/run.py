"""Vanilla TotalSegmentator against the warm in-memory segmenter, side by side on the same inputs and weights.

    .venv/bin/python bench/run.py                       # realistic 3 mm architecture, random weights
    .venv/bin/python bench/run.py --weights phantom     # the made phantom model (parity by Dice)
    .venv/bin/python bench/run.py --scans example_ct_sm --repeats 2 --device cuda

Every (variant, scan) runs in a fresh child process, so peak RSS is that run's own: its process alone, and plus
its largest child process (vanilla's preprocessing and export workers), the same way for every variant.
"forward share" is the network forward's share of the worker's seconds (segmentation and passport: what a batch
actor or Serve replica spends per scan; decoding and writing run in other tasks). Then the Ray Data batch job runs N
copies of one scan on a local Ray with k one-CPU actors, against k times the rate of one warm one-thread segmenter.
Figures go to ``bench/results/latest.json`` and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLES = Path(os.environ.get("BENCH_EXAMPLES", REPO / "tests" / "data" / "totalseg-example"))
#: Segmenter options per variant: "ours" is the exact path; "ours-fast" pulls the levers that trade exactness.
VARIANTS = {
    "ours": {},
    "ours-bf16": {"precision": "bf16"},
    "ours-crop": {"crop_to_body": True},
    "ours-fast": {"precision": "bf16", "crop_to_body": True},
}
PHANTOM_WEIGHTS = REPO / "ray_app" / "demo" / "phantom_weights"
DEFAULT_RANDOM_WEIGHTS = Path(tempfile.gettempdir()) / "ray_app_bench_weights"


SYNTHETIC = Path(tempfile.gettempdir()) / "ray_app_bench_synthetic_512x512x300.nii"


def synthetic_ct() -> Path:
    """512x512x300 at 0.78x0.78x1.5 mm: a phantom body with air around it and a table, as a scanner writes it.

    Made once, in the parent, so that no child's peak RSS includes building the phantom."""
    import nibabel as nib

    from ray_app.demo.phantom import make_phantom

    if not SYNTHETIC.exists():
        affine = np.diag([-0.78, -0.78, 1.5, 1.0])
        affine[:3, 3] = [200.0, 200.0, -225.0]
        ct, _ = make_phantom(4242, shape=(512, 512, 300), affine=affine)
        partial = SYNTHETIC.with_suffix(".partial.nii")
        nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj), ct.affine), partial)
        partial.replace(SYNTHETIC)
    return SYNTHETIC


def input_path(name: str) -> Path:
    return SYNTHETIC if name == "synthetic" else EXAMPLES / f"{name}.nii.gz"


def load_input(name: str):
    """The scan in memory, as a caller would hand it over (int16 HU, nothing memory-mapped)."""
    import nibabel as nib

    img = nib.load(input_path(name))
    return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)


class ForwardClock:
    """Seconds and calls inside the network's forward (hooks on the module, so vanilla's path is measured too)."""

    def __init__(self):
        self.seconds, self.calls, self._t = 0.0, 0, 0.0

    def attach(self, network) -> None:
        network.register_forward_pre_hook(self._pre)
        network.register_forward_hook(self._post)

    def _pre(self, *_):
        self._sync()
        self._t = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._t
        self.calls += 1

    @staticmethod
    def _sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def tile_gflop(network, patch_size, device) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, 1, *patch_size), device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(x)
    return counter.get_total_flops() / 1e9


def child(variant: str, scan: str, device: str, repeats: int, out_mask: str) -> dict:
    """One measurement, in its own process."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    clock = ForwardClock()
    networks = []
    original_init = nnUNetPredictor.initialize_from_trained_model_folder

    def init_and_hook(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        clock.attach(self.network)
        networks.append(self)

    nnUNetPredictor.initialize_from_trained_model_folder = init_and_hook  # measurement hook, bench only

    img = load_input(scan)
    walls, cpus, forwards, stages = [], [], [], {}
    mask = None
    if variant == "vanilla":
        from totalsegmentator.python_api import totalsegmentator

        from ray_app.core.totalseg import disable_usage_stats

        disable_usage_stats()
        for _ in range(repeats):
            clock.seconds = clock.calls = 0
            t, c = time.perf_counter(), _cpu()
            out = totalsegmentator(img, None, fast=True, device="gpu" if device == "cuda" else "cpu", quiet=True)
            walls.append(time.perf_counter() - t)
            cpus.append(_cpu() - c)
            forwards.append((clock.seconds, clock.calls))
        mask = np.asanyarray(out.dataobj).astype(np.uint8)
    else:
        from ray_app.core import outputs, pipeline
        from ray_app.core.scan import scan_from_image
        from ray_app.core.segmenter import Segmenter
        from ray_app.settings import Settings

        t = time.perf_counter()
        seg = Segmenter(fast=True, device=device, **VARIANTS[variant], settings=Settings())
        stages["load_model_s"] = time.perf_counter() - t
        for _ in range(repeats):
            clock.seconds = clock.calls = 0
            t, c = time.perf_counter(), _cpu()
            s = scan_from_image(img, "bench", Settings())
            read = time.perf_counter() - t
            t_worker = time.perf_counter()
            result = pipeline.segment_scan(seg, s)  # what a batch actor or a Serve replica does per scan
            worker = time.perf_counter() - t_worker
            assert result.ok, result.passport.get("error")
            t0 = time.perf_counter()
            outputs.mask_to_nifti_bytes(result.mask, s)
            write = time.perf_counter() - t0
            walls.append(time.perf_counter() - t)
            cpus.append(_cpu() - c)
            forwards.append((clock.seconds, clock.calls))
            stages.update({"read_decode_s": read, **result.passport["timings"], "worker_s": worker, "write_s": write})
        mask = result.mask
    np.save(out_mask, mask)
    net = networks[-1]
    gflop = tile_gflop(net.network, net.configuration_manager.patch_size, net.device)
    fwd_s, calls = forwards[-1]
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "variant": variant,
        "scan": scan,
        "device": device,
        "shape": list(img.shape),
        "wall_s": walls,
        "cpu_s": cpus,
        "forward_s": fwd_s,
        "forward_calls": calls,
        "forward_share": fwd_s / stages.get("worker_s", walls[-1]),
        "tile_gflop": gflop,
        "gflops_per_s": gflop * calls / fwd_s if fwd_s else None,
        "peak_rss_mb": self_rss,
        "peak_rss_children_mb": child_rss,
        "stages": stages,
        "threads": torch.get_num_threads(),
    }


def batch_child(scan: str, n: int, actors: int, device: str) -> dict:
    """The Ray Data job over ``n`` copies of ``scan`` with ``actors`` one-CPU actors, steady-state rate.

    The rate counts the scans after the first ``actors`` (the pool's warm-up: Ray start, model load) over the
    time between the ``actors``-th and the last finished passport."""
    from ray_app.adapters import batch

    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    path = input_path(scan)
    (work / "manifest.csv").write_text("scan_id,uri\n" + "".join(f"s{i:03d},{path}\n" for i in range(n)))
    batch.init_ray(num_cpus=actors + 1)  # one CPU per actor, one for decoding and writing
    t = time.time()
    report = batch.run_batch(
        batch.BatchConfig(
            manifest=str(work / "manifest.csv"),
            output=str(work / "out"),
            device=device,
            min_actors=actors,
            max_actors=actors,
            cpus_per_actor=1.0,
            gpus_per_actor=1.0 if device == "cuda" else 0,
        )
    )
    wall = time.time() - t
    assert report.succeeded == n, report.rows
    # finished_at: when the actor finished each passport (segmentation done; the write overlaps the next scan)
    arrivals = sorted(datetime.fromisoformat(r["finished_at"]).timestamp() for r in report.rows)
    steady = (n - actors) / (arrivals[-1] - arrivals[actors - 1]) if n > actors else None
    return {"scan": scan, "scans": n, "actors": actors, "wall_s": wall, "steady_scans_per_s": steady}


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def matmul_peak_gflops() -> float:
    """What this CPU's fp32 matmul reaches with these threads: the practical peak the forward is held to."""
    import torch

    a = torch.randn(4096, 4096)
    torch.mm(a, a)
    t = time.perf_counter()
    for _ in range(3):
        torch.mm(a, a)
    return 3 * 2 * 4096**3 / (time.perf_counter() - t) / 1e9


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    dices = {}
    for label in np.union1d(np.unique(a), np.unique(b)):
        if label == 0:
            continue
        x, y = a == label, b == label
        dices[int(label)] = float(2 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return {
        "voxel_agreement": float((a == b).mean()),
        "identical": bool(np.array_equal(a, b)),
        "min_dice": min(dices.values()) if dices else 1.0,
        "classes": len(dices),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="random", help="'random' (realistic architecture), 'phantom', or a path")
    p.add_argument("--scans", default="synthetic,example_ct,example_ct_sm")
    p.add_argument("--variants", default="vanilla,ours,ours-fast", help=f"vanilla and any of {sorted(VARIANTS)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=2, help="calls per run; the last one is reported (warm)")
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    p.add_argument("--batch", default="example_ct:6:2", help="SCAN:N:K for the Ray Data step ('' to skip)")
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "SCAN", "MASK"), help=argparse.SUPPRESS)
    p.add_argument("--batch-child", help=argparse.SUPPRESS)
    args = p.parse_args()

    weights = {"phantom": PHANTOM_WEIGHTS, "random": DEFAULT_RANDOM_WEIGHTS}.get(args.weights, Path(args.weights))
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.device, args.repeats, args.child[2])))
        return
    if args.batch_child:
        scan, n, k = args.batch_child.split(":")
        print(json.dumps(batch_child(scan, int(n), int(k), args.device)))
        return
    if args.weights == "random" and not (weights / "Dataset297_TotalSegmentator_total_3mm_1559subj").exists():
        subprocess.run([sys.executable, str(HERE / "make_random_weights.py"), str(weights)], check=True)
    env = {
        **os.environ,
        "TOTALSEG_WEIGHTS_PATH": str(weights),
        "TOTALSEG_HOME_DIR": tempfile.mkdtemp(prefix="bench-totalseg-home-"),
    }
    if "synthetic" in args.scans.split(","):
        synthetic_ct()
    results, masks = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-masks-"))

    def run_child(*child_args: str, threads: int | None = None) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--weights",
            args.weights,
            "--device",
            args.device,
            "--repeats",
            str(args.repeats),
            *child_args,
        ]
        child_env = {**env, "OMP_NUM_THREADS": str(threads)} if threads else env
        proc = subprocess.run(cmd, check=False, env=child_env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            sys.exit(f"{' '.join(child_args)} failed:\n{proc.stderr[-4000:]}")
        # the figures are the last JSON line: Ray may forward worker output to stdout after it
        return json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))

    for scan in args.scans.split(","):
        for variant in args.variants.split(","):
            mask_path = tmp / f"{variant}-{scan}.npy"
            results.append(run_child("--child", variant, scan, str(mask_path)))
            masks[variant, scan] = np.load(mask_path)
        if ("vanilla", scan) in masks:
            for variant in args.variants.split(","):
                if variant != "vanilla":
                    row = next(r for r in results if r["variant"] == variant and r["scan"] == scan)
                    row["parity_vs_vanilla"] = agreement(masks[variant, scan], masks["vanilla", scan])
    import torch

    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads",
        "weights": args.weights,
        "device": args.device,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "matmul_fp32_gflops": matmul_peak_gflops() if args.device == "cpu" else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save(batch_result) -> None:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "batch": batch_result}, indent=1))

    save(None)  # the per-scan figures are kept even if the batch step fails
    print(table(meta, results), flush=True)
    batch_result = None
    if args.batch:
        scan, n, k = args.batch.split(":")
        single = run_child("--child", "ours", scan, str(tmp / "single.npy"), threads=1)
        batch_result = run_child("--batch-child", args.batch)
        batch_result["single_worker_scans_per_s"] = 1 / single["stages"]["worker_s"]
        batch_result["efficiency"] = batch_result["steady_scans_per_s"] / (int(k) / single["stages"]["worker_s"])
        save(batch_result)
        b = batch_result
        print(
            f"Ray Data: {b['scans']} x {b['scan']}, {b['actors']} one-CPU actors: {b['steady_scans_per_s']:.4f} "
            f"scans/s steady ({b['wall_s']:.0f} s wall incl. start); one warm one-thread worker "
            f"{b['single_worker_scans_per_s']:.4f} scans/s; efficiency vs k x single: {b['efficiency']:.0%}"
        )


def table(meta: dict, results: list[dict]) -> str:
    lines = [
        f"{meta['machine']}; weights: {meta['weights']}; device: {meta['device']}; {meta['when']}",
        f"fp32 matmul reference: {meta['matmul_fp32_gflops'] or 0:.0f} GFLOP/s",
        "| scan | variant | wall s (warm) | CPU s | forward s | forward share | GFLOP/s | peak RSS MB main / + child | "
        "speed-up | parity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = next((x for x in results if x["scan"] == r["scan"] and x["variant"] == "vanilla"), None)
        speed = f"{base['wall_s'][-1] / r['wall_s'][-1]:.2f}x" if base else "-"
        par = r.get("parity_vs_vanilla")
        parity = (
            "-"
            if not par
            else (
                "identical"
                if par["identical"]
                else f"agree {par['voxel_agreement']:.5f}, min Dice {par['min_dice']:.4f}"
            )
        )
        # Counted the same way for every variant: the run's own process, then plus its largest child process
        # (getrusage's RUSAGE_CHILDREN ru_maxrss; vanilla's preprocessing/export workers). Peaks of different
        # processes need not coincide, so the sum is an upper bound of what was resident at once.
        rss = f"{r['peak_rss_mb']:.0f} / {r['peak_rss_mb'] + r['peak_rss_children_mb']:.0f}"
        lines.append(
            f"| {r['scan']} {tuple(r['shape'])} | {r['variant']} | {r['wall_s'][-1]:.1f} | "
            f"{r['cpu_s'][-1]:.1f} | {r['forward_s']:.1f} | {r['forward_share']:.0%} | "
            f"{r['gflops_per_s'] or 0:.0f} | {rss} | {speed} | {parity} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
