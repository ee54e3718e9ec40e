"""Load benchmark for the Serve endpoint (prints figures; not a test).

Sends N segment requests at concurrency C and prints latency percentiles, throughput, responses by status, and
the overhead over the segmenter's own time for the same scan: per request (client latency minus the replica's
``read_s + segment_s + passport_s`` from the passport) and against the ``Segmenter`` run in this process.

Against a running endpoint (token from RAY_APP_API_TOKEN):
    python bench/load_serve.py --url http://127.0.0.1:8000 --scan ct.nii.gz -n 20 -c 4
Self-contained: a local Ray + Serve with the project's phantom weights and a phantom scan:
    python bench/load_serve.py --start --replicas 1 --max-ongoing 2 --max-queued 8 -n 12 -c 3
"""

from __future__ import annotations

import argparse
import gzip
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTENT_TYPES = {".nii.gz": "application/gzip", ".nii": "application/x-nifti", ".zip": "application/zip"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples it reports a latency that happened)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def phantom_scan() -> bytes:
    import nibabel as nib

    from ray_app.demo.phantom import make_phantom

    ct = make_phantom(7)[0]
    return gzip.compress(nib.Nifti1Image(ct.get_fdata().astype("int16"), ct.affine).to_bytes(), compresslevel=1)


def start_local(args) -> str:
    """A local Ray (loopback only) and the app; the replicas inherit this process's environment."""
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
                "num_cpus": args.replica_cpus,
                "settings": {"download_weights": False},
            }
        ),
        name="ray-app",
        route_prefix="/",
    )
    return f"http://127.0.0.1:{port}"


def in_process_seconds(data: bytes, kind: str | None, threads: int, repeats: int) -> float:
    """Median ``Segmenter.segment`` + passport time for the scan in this process (model loaded once)."""
    from ray_app.core import pipeline
    from ray_app.core.scan import load_bytes
    from ray_app.core.segmenter import Segmenter
    from ray_app.settings import Settings

    segmenter = Segmenter(fast=True, num_threads=threads, settings=Settings())
    scan = load_bytes(data, "bench", kind=kind, settings=Settings())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = pipeline.segment_scan(segmenter, scan)
        times.append(time.perf_counter() - t)
        assert result.ok, result.passport.get("error")
    return statistics.median(times)


def run_load(url: str, token: str, data: bytes, content_type: str, n: int, c: int, mode: str):
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}

    def one(i: int):
        t = time.perf_counter()
        try:
            r = httpx.post(
                f"{url}/v1/segment",
                content=data,
                params={"scan_id": f"bench-{i}", "mode": mode},
                headers=headers,
                timeout=900,
            )
        except httpx.HTTPError as exc:
            return type(exc).__name__, time.perf_counter() - t, None
        server = None
        if r.status_code == 200:
            timings = r.json()["timings"]
            server = sum(timings.get(k, 0.0) for k in ("read_s", "segment_s", "passport_s"))
        return r.status_code, time.perf_counter() - t, server

    start = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        results = list(pool.map(one, range(n)))
    return results, time.perf_counter() - start


def report(title: str, results, wall: float) -> dict:
    ok = [(lat, srv) for status, lat, srv in results if status == 200]
    statuses = Counter(str(status) for status, _, _ in results)
    print(f"\n== {title}: {len(results)} requests in {wall:.1f} s")
    print("   responses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    if not ok:
        return {}
    lat = [x for x, _ in ok]
    overhead = [x - s for x, s in ok]
    out = {
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "throughput": len(ok) / wall,
        "server_p50": statistics.median(s for _, s in ok),
        "overhead_p50": statistics.median(overhead),
    }
    print(
        f"   latency s: p50 {out['p50']:.2f}  p95 {out['p95']:.2f}  p99 {out['p99']:.2f}  "
        f"(min {min(lat):.2f}, max {max(lat):.2f})"
    )
    print(f"   throughput: {out['throughput']:.3f} scans/s ({60 * out['throughput']:.1f} per minute)")
    print(
        f"   replica time (read+segment+passport) p50 {out['server_p50']:.2f} s; "
        f"latency minus replica time p50 {out['overhead_p50']:.2f} s (HTTP, proxy, routing, queueing)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running endpoint (default with --start: the one started here)")
    p.add_argument("--start", action="store_true", help="start a local Ray + Serve in this process")
    p.add_argument("--scan", help="NIfTI / .nii.gz / DICOM .zip file (default: a phantom)")
    p.add_argument("-n", "--requests", type=int, default=12)
    p.add_argument("-c", "--concurrency", type=int, default=3)
    p.add_argument("--sequential", type=int, default=3, help="requests at concurrency 1 first (clean overhead)")
    p.add_argument("--mode", choices=["fast", "normal"], default="fast")
    p.add_argument("--baseline", type=int, default=3, help="in-process Segmenter runs (0: skip)")
    p.add_argument("--baseline-threads", type=int, default=1, help="torch threads; match the replica's num_cpus")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--cluster-cpus", type=int, default=2)
    p.add_argument("--max-ongoing", type=int, default=2)
    p.add_argument("--max-queued", type=int, default=8)
    args = p.parse_args(argv)

    if args.start:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("TOTALSEG_WEIGHTS_PATH", str(REPO / "ray_app" / "demo" / "phantom_weights"))
        os.environ.setdefault("TOTALSEG_HOME_DIR", tempfile.mkdtemp(prefix="totalseg-home-"))
        os.environ.setdefault("RAY_APP_API_TOKEN", secrets.token_urlsafe(24))
    token = os.environ.get("RAY_APP_API_TOKEN")
    if not token:
        print("error: set RAY_APP_API_TOKEN", file=sys.stderr)
        return 2
    if args.scan:
        data = Path(args.scan).read_bytes()
        content_type = next(
            (ct for ext, ct in CONTENT_TYPES.items() if args.scan.endswith(ext)), "application/octet-stream"
        )
    else:
        data, content_type = phantom_scan(), "application/gzip"
    kind = {"application/gzip": "nifti-gz", "application/x-nifti": "nifti", "application/zip": "dicom-zip"}.get(
        content_type
    )

    baseline = None
    if args.baseline:
        # Before any load, so the in-process runs have the CPUs to themselves.
        baseline = in_process_seconds(data, kind, args.baseline_threads, args.baseline)
        print(
            f"in-process Segmenter + passport ({args.baseline_threads} thread(s)), median of {args.baseline}: "
            f"{baseline:.2f} s"
        )
    url = args.url or (start_local(args) if args.start else None)
    if not url:
        p.error("give --url or --start")
    print(f"endpoint {url}; scan {len(data)} bytes ({content_type}); mode {args.mode}")

    if args.sequential:
        results, wall = run_load(url, token, data, content_type, args.sequential, 1, args.mode)
        seq = report("sequential (c=1; the model is preloaded, so no request pays for loading it)", results, wall)
        if seq and baseline:
            print(
                f"   p50 latency over in-process time: +{seq['p50'] - baseline:.2f} s "
                f"({100 * (seq['p50'] / baseline - 1):.0f} %)"
            )
    results, wall = run_load(url, token, data, content_type, args.requests, args.concurrency, args.mode)
    load = report(f"load (n={args.requests}, c={args.concurrency})", results, wall)
    if load and baseline and args.start:
        print(
            f"   p50 latency over in-process time: +{load['p50'] - baseline:.2f} s; ideal throughput at "
            f"{args.replicas} replica(s): {args.replicas / baseline:.3f} scans/s"
        )
    if args.start:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
