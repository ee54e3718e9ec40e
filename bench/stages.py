"""CPU-seconds per scan of each stage of the batch job, run one after another in one process.

    PYTHONPATH=. .venv/bin/python bench/stages.py                  # synthetic 512x512x300, realistic network
    PYTHONPATH=. .venv/bin/python bench/stages.py --scan example_ct_sm --weights phantom   # seconds, a smoke run

The stages are the batch job's own functions (``ray_app.core.stages``, ``pipeline.finish_scan``'s parts):
decode and validate, prepare, what crosses to the actor, inference (and the network forward inside it, timed by
hooks on the module), finish, passport, mask encoding at several gzip levels (on the network's mask and on a
clean organ mask of the same grid: random weights give noisy masks that compress unlike real ones). Figures go to
``bench/results/stages.json`` and a table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DEFAULT_RANDOM_WEIGHTS, PHANTOM_WEIGHTS, ForwardClock, input_path, synthetic_ct  # noqa: E402

GZIP_LEVELS = (1, 3, 6, 9)


def clocked(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its wall and process CPU seconds (all threads)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}


def gzip_levels(mask: np.ndarray, scan) -> dict:
    from ray_app.core import outputs

    out = {}
    for level in GZIP_LEVELS:
        blob, t = clocked(lambda lv=level: outputs.mask_to_nifti_bytes(mask, scan, compresslevel=lv))
        out[str(level)] = {"cpu_s": t["cpu_s"], "mb": len(blob) / 1e6}
    return out


def clean_mask(shape, affine) -> np.ndarray:
    """TotalSegmentator's example organ mask, resampled onto ``shape``: the structure of a real mask."""
    import nibabel as nib

    from ray_app.core.stages import resample_labels

    seg = np.asanyarray(nib.load(HERE.parent / "tests/data/totalseg-example/example_seg_fast.nii.gz").dataobj)
    return np.asfortranarray(resample_labels(np.asarray(seg, np.uint8), shape))


def measure(scan_name: str, threads: int) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from ray_app.core import passport, stages
    from ray_app.core.scan import load_bytes
    from ray_app.core.segmenter import Segmenter
    from ray_app.settings import Settings

    clock = ForwardClock()
    original = nnUNetPredictor.initialize_from_trained_model_folder

    def init_and_hook(self, *a, **kw):
        original(self, *a, **kw)
        clock.attach(self.network)

    nnUNetPredictor.initialize_from_trained_model_folder = init_and_hook  # measurement hook, bench only
    settings = Settings()
    seg = Segmenter(fast=True, device="cpu", num_threads=threads, settings=settings)
    raw = input_path(scan_name).read_bytes()
    blob = raw if raw[:2] == b"\x1f\x8b" else gzip.compress(raw, compresslevel=1)  # the job reads .nii.gz
    spec = seg.spec
    for _warm in (True, False):  # the first round loads lazily imported modules; the second is reported
        clock.seconds = 0.0
        scan, t_read = clocked(load_bytes, blob, "bench", settings=settings)
        torch.set_num_threads(1)  # CPU tasks are single-threaded
        grid, t_prep = clocked(stages.first_pass, spec, scan.image)
        crossing = len(pickle.dumps(grid, protocol=5))
        torch.set_num_threads(threads)
        labels, t_infer = clocked(seg.infer, grid)
        torch.set_num_threads(1)
        order = stages.memory_order(scan.image)
        mask, t_finish = clocked(stages.finish, spec, grid, labels, scan.shape, order)
        doc, t_pass = clocked(
            lambda: passport.build_passport(
                scan, mask, label_map=spec.output_labels, model={}, timings={}, settings=settings
            )
        )
        assert doc["status"] == "ok"
    clean = clean_mask(scan.shape, scan.affine)
    _, t_pass_clean = clocked(
        lambda: passport.build_passport(
            scan, clean, label_map=spec.output_labels, model={}, timings={}, settings=settings
        )
    )
    outside = t_read["cpu_s"] + t_prep["cpu_s"] + t_finish["cpu_s"] + t_pass["cpu_s"]
    return {
        "scan": scan_name,
        "shape": list(scan.shape),
        "model_grid": list(grid.data.shape),
        "actor_input_mb": crossing / 1e6,
        "ct_mb": np.asanyarray(scan.image.dataobj).nbytes / 1e6,
        "actor_threads": threads,
        "stages": {
            "read_decode_validate": t_read,
            "prepare": t_prep,
            "infer": {**t_infer, "forward_s": clock.seconds},
            "finish": t_finish,
            "passport": t_pass,
            "passport_clean_mask": t_pass_clean,
        },
        "outside_actor_cpu_s": outside,
        "forward_share_of_actor": clock.seconds / t_infer["wall_s"],
        "gzip_network_mask": gzip_levels(mask, scan),
        "gzip_clean_mask": gzip_levels(clean, scan),
    }


def table(r: dict) -> str:
    lines = [
        f"{r['scan']} {tuple(r['shape'])} -> model grid {tuple(r['model_grid'])}: {r['actor_input_mb']:.1f} MB "
        f"to the actor (CT {r['ct_mb']:.0f} MB); actor {r['actor_threads']} thread(s)",
        "| stage | wall s | CPU s |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['wall_s']:.2f} | {v['cpu_s']:.2f} |" for k, v in r["stages"].items()]
    lines.append(
        f"outside the actor (read, prepare, finish, passport): {r['outside_actor_cpu_s']:.2f} CPU-s; "
        f"forward share of the actor's time: {r['forward_share_of_actor']:.0%}"
    )
    for name in ("gzip_network_mask", "gzip_clean_mask"):
        levels = ", ".join(f"{k}: {v['cpu_s']:.2f} s {v['mb']:.2f} MB" for k, v in r[name].items())
        lines.append(f"{name} (level: CPU s, size): {levels}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", default="synthetic", help="'synthetic' (512x512x300) or an example name")
    p.add_argument("--weights", default="random", help="'random' (realistic architecture), 'phantom', or a path")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the inference stage")
    p.add_argument("--out", default=str(HERE / "results" / "stages.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.scan, args.threads)))
        return
    weights = {"phantom": PHANTOM_WEIGHTS, "random": DEFAULT_RANDOM_WEIGHTS}.get(args.weights, Path(args.weights))
    if args.weights == "random" and not (weights / "Dataset297_TotalSegmentator_total_3mm_1559subj").exists():
        subprocess.run([sys.executable, str(HERE / "make_random_weights.py"), str(weights)], check=True)
    if args.scan == "synthetic":
        synthetic_ct()
    env = {
        **os.environ,
        "TOTALSEG_WEIGHTS_PATH": str(weights),
        "TOTALSEG_HOME_DIR": tempfile.mkdtemp(prefix="bench-totalseg-home-"),
        "OMP_NUM_THREADS": str(args.threads),
    }
    cmd = [sys.executable, __file__, "--child", "--scan", args.scan, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["meta"] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "weights": args.weights,
        "load_average": os.getloadavg(),
        "command": "PYTHONPATH=. python bench/stages.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
