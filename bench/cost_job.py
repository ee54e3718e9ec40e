"""The monthly bill from a real job: `ray-app batch` with its defaults over realistic-size CTs, then `ray-app cost`.

    .venv/bin/python bench/cost_job.py [--scans 2]      # the jobs (minutes of every CPU), then the projections
    .venv/bin/python bench/cost_job.py --reproject      # only the projections, from the committed summaries

Compute comes from a job with the realistic 3 mm architecture and random weights (bench/make_random_weights.py:
the real model's compute, memory and I/O) on the 512x512x300 synthetic CT of bench/run.py, one manifest row per
scan (the same file under distinct ids). Random weights make speckled masks that compress far worse than an
organ mask, so the sizes of the results come from a second job on the same CT with the phantom weights, whose
masks are clean organ shapes (`--mask-mb`, `--passport-kb`). Both jobs' summaries are kept in
bench/results/cost-job/, so the projections can be made again without segmenting (`--reproject`: after a change
of prices, defaults or the report). Then `ray-app cost` with its defaults (cluster.yaml's shape), with the input
bucket's Glacier IR rule priced for the CT's own size, and with the former default shape (c7i.4xlarge, 8-thread
actors, m7i.xlarge head) for comparison. Writes bench/results/cost.txt with the commands and outputs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import DEFAULT_RANDOM_WEIGHTS, PHANTOM_WEIGHTS, REPO, synthetic_ct

RAY_APP = str(Path(sys.executable).with_name("ray-app"))
KEPT = REPO / "bench" / "results" / "cost-job"
PROJECTIONS = "# ray-app cost on the summaries kept in bench/results/cost-job/"
FORMER_SHAPE = ["--cpu-instance", "c7i.4xlarge", "--cpus-per-actor", "8", "--head-instance", "m7i.xlarge"]


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
    parser.add_argument(
        "--reproject",
        action="store_true",
        help="no jobs: the projections again from the summaries in bench/results/cost-job/ (the jobs' part of --out"
        " kept)",
    )
    args = parser.parse_args()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    if args.reproject:
        jobs_part = Path(args.out).read_text().split("\n$ ray-app cost")[0].split("\n" + PROJECTIONS)[0]
        Path(args.out).write_text(jobs_part.rstrip() + "\n\n" + projections(env))
        print(f"wrote {args.out}")
        return

    weights = DEFAULT_RANDOM_WEIGHTS
    if not (weights / "Dataset297_TotalSegmentator_total_3mm_1559subj").exists():
        subprocess.run([sys.executable, str(REPO / "bench" / "make_random_weights.py"), str(weights)], check=True)
    ct = synthetic_ct()
    work = Path(tempfile.mkdtemp(prefix="cost-job-"))
    (work / "manifest.csv").write_text("scan_id,uri\n" + "".join(f"ct-{i},{ct}\n" for i in range(args.scans)))

    def job(weights: Path, name: str) -> tuple[str, str, float]:
        started = time.time()
        cmd = [RAY_APP, "batch", "--manifest", str(work / "manifest.csv"), "--output", str(work / name)]
        out = _run(cmd, {**env, "TOTALSEG_WEIGHTS_PATH": str(weights)})
        return out, re.search(r"summary: (\S+)", out).group(1), time.time() - started

    batch, summary, wall = job(weights, "realistic")
    sizes_batch, sizes_summary, _ = job(PHANTOM_WEIGHTS, "phantom")
    KEPT.mkdir(exist_ok=True)
    shutil.copyfile(summary, KEPT / "realistic-summary.parquet")
    shutil.copyfile(sizes_summary, KEPT / "phantom-summary.parquet")

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
            f"# both summaries kept: {KEPT.relative_to(REPO)}/realistic-summary.parquet, phantom-summary.parquet",
            "",
            projections(env),
        ]
    )
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


def projections(env: dict) -> str:
    """`ray-app cost` on the kept summaries: the defaults, the input rule, the former default shape."""
    from ray_app.ops.cost import measure

    summary = str(KEPT / "realistic-summary.parquet")
    clean = measure([str(KEPT / "phantom-summary.parquet")])
    mask_mb = clean.large_bytes_per_scan / 1024**2
    passport_kb = (clean.bytes_per_scan - clean.large_bytes_per_scan) / 1024
    sizes = ["--mask-mb", f"{mask_mb:.3f}", "--passport-kb", f"{passport_kb:.1f}"]
    ct = synthetic_ct()  # the job's input: its size as stored prices the input rule
    inputs = ["--input-glacier-days", "90", "--input-mb", f"{ct.stat().st_size / 1024**2:.1f}"]
    runs = (sizes, [*sizes, *inputs], [*sizes, *FORMER_SHAPE])
    out = [
        f"{PROJECTIONS} ({time.strftime('%Y-%m-%d')}; SUMMARY = {KEPT.relative_to(REPO)}/realistic-summary.parquet,"
        " sizes from phantom-summary.parquet; input size: the job's CT as stored. A job's own 'projected:' line"
        " above used the report's defaults of the day it ran)",
        "",
    ]
    for opts in runs:
        printed = _run([RAY_APP, "cost", "--summary", summary, "--scans-per-month", "10000", *opts], env)
        out += ["$ ray-app cost --summary SUMMARY --scans-per-month 10000 " + " ".join(opts), printed.strip(), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
