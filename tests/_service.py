"""Start the real Serve application on the session's Ray for a test module, and read the logs it leaves."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ray_app.ops.cluster import free_port


@contextlib.contextmanager
def running_service(token: str, settings: dict[str, Any], *, max_queued: int = 4) -> Iterator[httpx.Client]:
    """One replica (1 CPU) on 127.0.0.1:<free port>, ready once its model is loaded; shut down on exit so the
    next module gets the CPU back (a batch job on 2 CPUs cannot run beside a replica). The token goes in through
    a 0600 file, as a mounted secret would (builder arguments refuse it: they end up in Serve's stored config)."""
    from ray import serve

    from ray_app.adapters.serve import build_app

    secret_dir = tempfile.mkdtemp(prefix="token-")
    token_file = Path(secret_dir) / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    settings = {"api_token_file": str(token_file), **settings}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app(
                {
                    "min_replicas": 1,
                    "max_replicas": 1,
                    "max_ongoing_requests": 1,
                    "max_queued_requests": max_queued,
                    "num_cpus": 1,
                    "settings": {"download_weights": False, **settings},
                }
            ),
            name="ray-app",
            route_prefix="/",
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            deadline = time.monotonic() + 180
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the model did not load within 180 s"
                time.sleep(0.5)
            yield client
    finally:
        serve.shutdown()
        shutil.rmtree(secret_dir, ignore_errors=True)


def session_log_files() -> list[Path]:
    """Every file under this Ray session's ``logs`` folder (driver, workers, Serve controller, proxy, replicas)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def log_hits(needles: list[str], paths: list[Path] | None = None) -> dict[str, list[str]]:
    """needle -> names of the files that contain it (bytes search, so any encoding is covered); by default the files
    of this Ray session's logs."""
    hits: dict[str, list[str]] = {n: [] for n in needles}
    for path in session_log_files() if paths is None else paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for needle in needles:
            if needle.encode() in data:
                hits[needle].append(path.name)
    return {n: files for n, files in hits.items() if files}
