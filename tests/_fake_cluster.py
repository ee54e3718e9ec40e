"""Ray's fake multinode cluster on this machine: a ``ray start --head`` whose autoscaler launches and removes
worker nodes (each a separate raylet with its own processes) for cluster.yaml's node types.

Tests drive it from their own processes (a driver script, ``ray-app batch``), so the test process never joins
it. Fake nodes are told apart through ``RAY_OVERRIDE_NODE_ID_FOR_TESTING=<node id>``: the fake provider sets it
on each node's raylet, whose workers and agents inherit it (``/proc/PID/environ``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from ray_app.ops.cluster import fake_multinode_config, free_port, processes_mentioning
from tests._ray import stop_process

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
LABELS = {"spot_cpu": ("m7a.", "m7i."), "spot_gpu": ("g4dn.", "g5.", "g6.")}
RAY_CLI = str(Path(sys.executable).with_name("ray"))
NODE_ID_ENV = b"RAY_OVERRIDE_NODE_ID_FOR_TESTING="


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared_cluster() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_cluster())
    validate_config(config)
    return config


def workers(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def label_of(node_type: dict) -> str:
    (label,) = [r for r in node_type["resources"] if r in LABELS]
    return label


def node_processes() -> dict[str, dict[int, str]]:
    """Live processes of each fake worker node: node id -> {pid: title or command}."""
    nodes: dict[str, dict[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if not cmdline:  # a zombie
            continue
        for var in environ.split(b"\0"):
            if var.startswith(NODE_ID_ENV):
                title = cmdline.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
                nodes.setdefault(var[len(NODE_ID_ENV) :].decode(), {})[int(entry.name)] = title
    return nodes


@contextlib.contextmanager
def fake_cluster(
    tmp_path: Path, head_cpus: int = 0, max_workers_per_type: int = 1, env: dict[str, str] | None = None
) -> Iterator[dict]:
    """Start a head with the fake autoscaler on cluster.yaml's node types; yield its address, environment and temp
    dir (``leftovers`` is filled in on exit: Ray processes that outlived the head, then killed)."""
    port = free_port()
    fake_yaml = tmp_path / "fake-cluster.yaml"
    fake_yaml.write_text(yaml.safe_dump(fake_multinode_config(prepared_cluster(), port, max_workers_per_type)))
    temp_dir = tempfile.mkdtemp(prefix="rayfake-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        **(env or {}),
    }
    env.pop("RAY_ADDRESS", None)
    cluster = {
        "address": f"127.0.0.1:{port}",
        "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
        "temp_dir": temp_dir,
        "leftovers": [],
    }
    with open(tmp_path / "head.log", "wb") as log:
        head = subprocess.Popen(
            [
                RAY_CLI,
                "start",
                "--head",
                "--block",
                f"--port={port}",
                f"--num-cpus={head_cpus}",
                f"--object-store-memory={200 * 1024**2}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--autoscaling-config={fake_yaml}",
                f"--temp-dir={temp_dir}",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield cluster
    finally:
        stop_process(head)
        deadline = time.monotonic() + 30
        while processes_mentioning(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        cluster["leftovers"] = processes_mentioning(temp_dir)
        for pid in cluster["leftovers"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)
