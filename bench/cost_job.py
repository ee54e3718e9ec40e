"""The monthly bill from a real job: `ray-app batch` with its defaults over realistic-size CTs, then `ray-app cost`.

    .venv/bin/python bench/cost_job.py [--scans 2]

Uses the realistic 3 mm architecture with random weights (bench/make_random_weights.py: compute, memory and I/O of
the real model; meaningless masks) and the 512x512x300 synthetic CT of bench/run.py, one manifest row per scan (the
same file under distinct ids). Writes bench/results/cost.txt: the commands, the job's table and the cost report.
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

from run import DEFAULT_RANDOM_WEIGHTS, REPO, synthetic_ct

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
    env = {**os.environ, "TOTALSEG_WEIGHTS_PATH": str(weights)}
    env.pop("RAY_ADDRESS", None)

    started = time.time()
    batch_cmd = [RAY_APP, "batch", "--manifest", str(work / "manifest.csv"), "--output", str(work / "out")]
    batch = _run(batch_cmd, env)
    wall = time.time() - started
    summary = re.search(r"summary: (\S+)", batch).group(1)
    cost_cmd = [RAY_APP, "cost", "--summary", summary, "--scans-per-month", "10000"]  # and 1,000,000 beside it
    cost = _run(cost_cmd, env)

    text = "\n".join([
        f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs; made by: .venv/bin/python bench/cost_job.py "
        f"--scans {args.scans}",
        f"# {args.scans} x synthetic 512x512x300 CT (0.78x0.78x1.5 mm), realistic 3 mm architecture, random weights",
        f"$ ray-app batch --manifest MANIFEST --output OUT      (defaults; whole command {wall:.0f} s)",
        batch.strip(), "", "$ " + " ".join(["ray-app", *cost_cmd[1:3], "SUMMARY", *cost_cmd[4:]]), cost.strip(), ""])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
