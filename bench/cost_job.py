"""The monthly bill from a real job: `ray-app batch` with its defaults over realistic-size CTs, then `ray-app cost`.

    .venv/bin/python bench/cost_job.py [--scans 2]

Compute comes from a job with the realistic 3 mm architecture and random weights (bench/make_random_weights.py:
the real model's compute, memory and I/O) on the 512x512x300 synthetic CT of bench/run.py, one manifest row per
scan (the same file under distinct ids). Random weights make speckled masks that compress far worse than an
organ mask, so the sizes of the results come from a second job on the same CT with the phantom weights, whose
masks are clean organ shapes (`--mask-mb`, `--passport-kb`). Then `ray-app cost` with its defaults, and with the
memory-fitted worker shape deploy/README.md discusses. Writes bench/results/cost.txt with the commands and outputs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import DEFAULT_RANDOM_WEIGHTS, PHANTOM_WEIGHTS, REPO, synthetic_ct

RAY_APP = str(Path(sys.executable).with_name("ray-app"))


def _run(cmd: list[str], env: dict) -> str:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    sys.stdout.write(done.stdout[-6000:])
    if done.returncode not in (0,):
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"{cmd[1]} exited {done.returncode}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cost.txt"))
    args = parser.parse_args()

    weights = DEFAULT_RANDOM_WEIGHTS
    if not (weights / "Dataset297_TotalSegmentator_total_3mm_1559subj").exists():
        subprocess.run([sys.executable, str(REPO / "bench" / "make_random_weights.py"), str(weights)], check=True)
    ct = synthetic_ct()
    work = Path(tempfile.mkdtemp(prefix="cost-job-"))
    (work / "manifest.csv").write_text("scan_id,uri\n" + "".join(f"ct-{i},{ct}\n" for i in range(args.scans)))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)

    def job(weights: Path, name: str) -> tuple[str, str, float]:
        started = time.time()
        cmd = [RAY_APP, "batch", "--manifest", str(work / "manifest.csv"), "--output", str(work / name)]
        out = _run(cmd, {**env, "TOTALSEG_WEIGHTS_PATH": str(weights)})
        return out, re.search(r"summary: (\S+)", out).group(1), time.time() - started

    batch, summary, wall = job(weights, "realistic")
    sizes_batch, sizes_summary, _ = job(PHANTOM_WEIGHTS, "phantom")
    from ray_app.ops.cost import measure

    clean = measure([sizes_summary])
    mask_mb = clean.large_bytes_per_scan / 1024**2
    passport_kb = (clean.bytes_per_scan - clean.large_bytes_per_scan) / 1024
    sizes = ["--mask-mb", f"{mask_mb:.3f}", "--passport-kb", f"{passport_kb:.1f}"]
    shape = [
        "--cpu-instance",
        "m7a.4xlarge",
        "--cpus-per-actor",
        "2",
        "--vcpu-yield",
        "1",
        "--head-instance",
        "m7i.large",
    ]
    reports = [
        (opts, _run([RAY_APP, "cost", "--summary", summary, "--scans-per-month", "10000", *opts], env))
        for opts in (sizes, [*sizes, *shape])
    ]

    text = "\n".join(
        [
            f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs; made by: .venv/bin/python bench/cost_job.py "
            f"--scans {args.scans}",
            f"# {args.scans} x synthetic 512x512x300 CT (0.78x0.78x1.5 mm), realistic 3 mm architecture,"
            " random weights",
            f"$ ray-app batch --manifest MANIFEST --output OUT      (defaults; whole command {wall:.0f} s)",
            batch.strip(),
            "",
            "# the same CT with the phantom weights (clean organ masks), for the sizes of what a job writes",
            sizes_batch.strip().splitlines()[-3],
            "",
            *[
                line
                for opts, out in reports
                for line in (
                    "$ ray-app cost --summary SUMMARY --scans-per-month 10000 " + " ".join(opts),
                    out.strip(),
                    "",
                )
            ],
        ]
    )
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
