"""A separate ``ray start --head`` cluster for tests that need one (``ray job submit``, ``serve deploy``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from ray_app.ops.cluster import free_port

RAY_BIN = Path(sys.executable).parent


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def ray_head(
    num_cpus: int = 1, env: dict[str, str] | None = None, before_stop: Callable[[dict], None] | None = None
) -> Iterator[dict]:
    """Start a head on loopback with its own ports and temp dir; yield its dashboard URL and environment; stop it
    by PID (``ray start --block`` cleans up every process it started)."""
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    temp_dir = tempfile.mkdtemp(prefix="rayhd")  # short: Ray's unix sockets live under it
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{RAY_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # job entrypoints' `python` is ours
        **(env or {}),
    }
    args = [
        str(RAY_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]
    with open(Path(temp_dir) / "ray-start.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    head = {"dashboard": f"http://127.0.0.1:{ports['dashboard-port']}", "env": env, "temp_dir": temp_dir}
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
            try:
                if httpx.get(f"{head['dashboard']}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the head node's dashboard did not come up in 90 s"
            time.sleep(0.5)
        yield head
    finally:
        if before_stop is not None:
            before_stop(head)
        stop_process(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
