"""Soak test for the Serve endpoint (prints figures; not part of the test suite).

Keeps more requests in flight than the deployment can hold (``replicas * (max_ongoing + max_queued)``) for the
given time and checks the overload contract: every answer is ``200`` or Serve's ``503`` backpressure (no other
5xx, no connection errors), and the replica's resident memory stays flat (growth under 10% from the end of the
warm-up to the end of the run, by window medians and peaks).
Prints latency percentiles, throughput, the status mix and the RSS series.

Self-contained (a local Ray + Serve with the project's phantom weights and a one-tile phantom scan):
    python bench/soak_serve.py --minutes 5 -c 8
Exit code 1 when the contract is broken.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.load_serve import percentile


def one_tile_phantom() -> bytes:
    """A 96x80x80 abdominal crop at 3 mm (one network tile): a few seconds per request."""
    import nibabel as nib
    import numpy as np

    from ray_app.demo.phantom import make_phantom

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-142.5, -118.5, -133.5)
    ct = make_phantom(7, affine=affine, shape=(96, 80, 80))[0]
    return gzip.compress(nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), ct.affine).to_bytes(), 1)


def start_local(args, token_file: str) -> str:
    import ray
    from ray import serve

    from ray_app.adapters.serve import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=args.cluster_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "min_replicas": args.replicas,
                "max_replicas": args.replicas,
                "max_ongoing_requests": args.max_ongoing,
                "max_queued_requests": args.max_queued,
                "retry_after_s": 1,
                "num_cpus": args.replica_cpus,
                "settings": {"download_weights": False, "api_token_file": token_file},
            }
        ),
        name="ray-app",
        route_prefix="/",
    )
    return f"http://127.0.0.1:{port}"


def replica_pids() -> list[int]:
    import ray._private.state

    return [
        a["Pid"]
        for a in ray._private.state.actors().values()
        if "SegmentService" in a["ActorClassName"] and a["State"] == "ALIVE"
    ]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("-c", "--concurrency", type=int, default=8, help="client threads, each with one request in flight")
    p.add_argument("--warmup-s", type=float, default=45.0, help="RSS baseline is taken after this")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--cluster-cpus", type=int, default=2)
    p.add_argument("--max-ongoing", type=int, default=1)
    p.add_argument("--max-queued", type=int, default=2)
    p.add_argument("--sample-s", type=float, default=2.0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOTALSEG_WEIGHTS_PATH", str(REPO / "ray_app" / "demo" / "phantom_weights"))
    os.environ.setdefault("TOTALSEG_HOME_DIR", tempfile.mkdtemp(prefix="totalseg-home-"))
    import httpx

    token = secrets.token_urlsafe(24)
    token_file = Path(tempfile.mkdtemp(prefix="soak-")) / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    capacity = args.replicas * (args.max_ongoing + args.max_queued)
    data = one_tile_phantom()
    url = start_local(args, str(token_file))
    with httpx.Client(base_url=url, timeout=60) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.5)
    print(
        f"endpoint {url}; capacity {capacity} requests ({args.replicas} replica(s) x (max_ongoing "
        f"{args.max_ongoing} + max_queued {args.max_queued})); {args.concurrency} clients for {args.minutes} min"
    )

    results: list[tuple[float, str, float]] = []  # (time since start, status, latency)
    lock = threading.Lock()
    start = time.monotonic()
    end = start + 60 * args.minutes
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/gzip"}

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            i = 0
            while time.monotonic() < end:
                t = time.monotonic()
                try:
                    r = http.post("/v1/segment", content=data, params={"scan_id": f"soak-{k}-{i}"}, headers=headers)
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    results.append((t - start, status, time.monotonic() - t))
                i += 1
                if status == "503":
                    time.sleep(0.2)  # keep the pressure on: a polite client would wait Retry-After

    rss: list[tuple[float, float]] = []

    def sampler() -> None:
        while time.monotonic() < end:
            pids = replica_pids()
            total = sum(v for v in (rss_mib(pid) for pid in pids) if v is not None)
            if pids:
                rss.append((time.monotonic() - start, total))
            time.sleep(args.sample_s)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.concurrency)]
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start

    statuses = Counter(s for _, s, _ in results)
    ok = [lat for _, s, lat in results if s == "200"]
    rejected = [lat for _, s, lat in results if s == "503"]
    other = {s: n for s, n in statuses.items() if s not in ("200", "503")}
    # RSS swings by several hundred MiB within one request, so windows are compared, not single samples: the
    # median and the peak of the first third after warm-up against those of the last third.
    after_warmup = [v for t, v in rss if t >= args.warmup_s] or [v for _, v in rss]
    third = max(1, len(after_warmup) // 3)
    head, tail = after_warmup[:third], after_warmup[-third:]
    base = statistics.median(head)
    growth = (statistics.median(tail) - base) / base
    peak_growth = (max(tail) - max(head)) / max(head)
    figures = {
        "minutes": round(wall / 60, 2),
        "concurrency": args.concurrency,
        "capacity": capacity,
        "responses": dict(statuses),
        "ok_per_min": round(60 * len(ok) / wall, 2),
        "latency_200_s": {
            "p50": percentile(ok, 50),
            "p95": percentile(ok, 95),
            "p99": percentile(ok, 99),
            "max": max(ok),
        }
        if ok
        else None,
        "latency_503_s": {"p50": percentile(rejected, 50), "p99": percentile(rejected, 99)} if rejected else None,
        "replica_rss_mib": {
            "first_third_median": round(base, 1),
            "last_third_median": round(statistics.median(tail), 1),
            "first_third_max": round(max(head), 1),
            "last_third_max": round(max(tail), 1),
            "growth_pct_median": round(100 * growth, 2),
            "growth_pct_peak": round(100 * peak_growth, 2),
        },
        "rss_series": [(round(t), round(v)) for t, v in rss],
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "rss_series"}, indent=1))
    print("replica RSS MiB over time (s, MiB):", figures["rss_series"])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))

    problems = []
    if other:
        problems.append(f"answers other than 200/503: {other}")
    if not ok or not rejected:
        problems.append("the run saw no 200 or no 503: not above capacity, or nothing served")
    if growth >= 0.10 or peak_growth >= 0.10:
        problems.append(f"replica RSS grew {100 * growth:.1f}% (median), {100 * peak_growth:.1f}% (peak); limit 10%")
    print("PASS: only 503 backpressure, replica RSS stable" if not problems else "FAIL: " + "; ".join(problems))
    from ray import serve

    serve.shutdown()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
