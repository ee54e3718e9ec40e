"""Orchestration at manifest scale (prints and writes figures; not part of the test suite).

For each manifest length and passport store: a manifest of rows whose files do not exist (each scan a failure
record through every stage: the pure cost of planning, scheduling, writing records and the summary), run once,
then run again, when the resume check skips them all. Each run is its own process with its own local Ray (2
CPUs), so its peak resident memory is the driver's alone. DynamoDB is a ``moto_server`` on loopback.

    python bench/manifest_scale.py --rows 10000 100000 --stores sqlite dynamodb
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
WEIGHTS = REPO / "ray_app" / "demo" / "phantom_weights"


def one_run(manifest: str, output: str, passports: str, job_id: str) -> dict:
    """In this process: run the job, return wall time, the driver's peak RSS and the job's counts."""
    from ray_app.adapters.batch import BatchConfig, init_ray, run_batch

    init_ray(num_cpus=2)
    start = time.perf_counter()
    report = run_batch(BatchConfig(manifest=manifest, output=output, passports=passports, job_id=job_id, max_actors=1))
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": round(wall, 1), "driver_peak_rss_mib": round(peak_mib), "counts": report.counts}


def write_manifest(folder: Path, rows: int) -> Path:
    path = folder / f"manifest-{rows}.csv"
    with path.open("w") as f:
        f.write("scan_id,uri\n")
        f.writelines(f"scan-{i:07d},{folder / 'absent' / f'scan-{i:07d}.nii.gz'}\n" for i in range(rows))
    return path


@contextmanager
def moto(env: dict):
    """A moto_server on a free loopback port, with test credentials; yields the environment pointing at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **env,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # werkzeug under load may not stop on SIGTERM in time
            proc.kill()
            proc.wait()


def measure(rows: int, store: str, folder: Path, env: dict) -> list[dict]:
    """The first run and the re-run of one manifest length with one store, each in its own process."""
    manifest = write_manifest(folder, rows)
    output = folder / f"out-{store}-{rows}"
    if store == "dynamodb":
        table = f"scale-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            [sys.executable, "-c", f"from ray_app.storage.sinks import create_table; create_table({table!r})"],
            env=env,
            check=True,
        )
        passports = f"dynamodb://{table}"
    else:
        passports = f"sqlite:///{output / 'passports.sqlite'}"
    figures = []
    for run in ("first", "rerun"):
        code = f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from bench.manifest_scale import one_run; "
        code += f"print('RESULT', json.dumps(one_run({str(manifest)!r}, {str(output)!r}, {passports!r}, {run!r})))"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{store} {rows} {run} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        result = {"rows": rows, "store": store, "run": run, **json.loads(line[len("RESULT ") :])}
        result["scans_per_s"] = round(rows / result["wall_s"], 1)
        print(json.dumps(result), flush=True)
        figures.append(result)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--stores", nargs="+", choices=["sqlite", "dynamodb"], default=["sqlite", "dynamodb"])
    p.add_argument("--out", default=str(RESULTS / "manifest_scale"), help="writes OUT.json and OUT.txt")
    args = p.parse_args(argv)
    env = {**os.environ, "TOTALSEG_WEIGHTS_PATH": str(WEIGHTS), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    figures = []
    with tempfile.TemporaryDirectory(prefix="manifest-scale-") as tmp:
        env["TOTALSEG_HOME_DIR"] = tmp
        for store in args.stores:
            with moto(env) if store == "dynamodb" else _same(env) as store_env:
                for rows in args.rows:
                    figures.extend(measure(rows, store, Path(tmp), store_env))
    command = "python bench/manifest_scale.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(write_results(figures, command, args.out))
    return 0


def write_results(figures: list[dict], command: str, out: str) -> str:
    """OUT.json (every figure, the command, the machine and its load) and OUT.txt (a table); returns the table."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, load average at the end {load} (other work shares them)"
    doc = {"command": command, "machine": machine, "runs": figures}
    Path(out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"$ {command}", machine, f"{'rows':>8} {'store':<9} {'run':<6} {'wall s':>7} {'RSS MiB':>8} scans/s"]
    for f in figures:
        lines.append(
            f"{f['rows']:>8} {f['store']:<9} {f['run']:<6} {f['wall_s']:>7} {f['driver_peak_rss_mib']:>8} "
            f"{f['scans_per_s']}"
        )
    Path(out + ".txt").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


@contextmanager
def _same(env: dict):
    yield env


if __name__ == "__main__":
    sys.exit(main())
