"""Job-scoped clusters: one command brings the cluster up, runs one batch job on it and removes every node the
launcher made when the job ends, so that nothing bills while no scan waits.

    ray-app cluster run -- --manifest s3://in/m.csv --output s3://out/ct/ --table passports

The cluster comes up with Ray's own launcher (``ray.autoscaler.sdk``: what ``ray up`` / ``ray down`` run), the job
is submitted on the head with Ray's job CLI (its logs stream back here until it ends, and its exit status is this
command's), and ``ray.autoscaler.sdk.teardown_cluster`` removes head and workers afterwards: on success, on
failure, on Ctrl-C or SIGTERM. When this process cannot do it (the laptop closed, the SSH session lost), the head's
dead-man's switch (:mod:`ray_app.ops.deadman`) does. Running the same command again resumes: the passport store
skips the scans already done.

:class:`LocalLauncher` rehearses the same lifecycle on this machine with Ray's fake multinode provider standing
in for EC2 (a real head, autoscaler and one raylet per worker node), no AWS account needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from pydantic import SecretStr

from ray_app import storage
from ray_app.settings import Settings

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"  # the checkout's, beside the package
ENV_PREFIX = "RAY_APP_"


def job_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings a job on the cluster runs with: this shell's ``RAY_APP_*`` variables except secrets, and the
    region resolved here. Ray logs a job's runtime_env, so no secret may be in it: credentials come from the nodes'
    instance profiles, and the Serve token from a file on the nodes (deploy/README.md)."""
    environ = os.environ if environ is None else environ
    secret = {
        ENV_PREFIX + name.upper()
        for name, field in Settings.model_fields.items()
        if SecretStr in getattr(field.annotation, "__args__", (field.annotation,))
    }
    env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k not in secret and not k.endswith("_FILE")}
    env[ENV_PREFIX + "AWS_REGION"] = storage.aws_region()[0]
    return env


SERVE_HEAD_INSTANCE = "m7i.large"
SERVE_CONFIG_HEADER = """\
# The always-on Serve endpoint's cluster: its own deployment with its own cost line (`ray-app cost` prices it
# apart from the batch bill). Generated from cluster.yaml by `python -m ray_app.ops.cluster serve-config`
# (tests/test_cluster.py keeps the two in step): a small on-demand head that holds Serve's HTTP proxy and lives
# until `ray down`; replicas (serve_config.yaml, min_replicas: 0) on Spot CPU workers that scale from zero. No
# dead-man's switch and no host shutdown: this head is meant to stay up.
#
#   ray up deploy/serve-cluster.yaml      # from the repository root; ~/.ray-app-token holds the bearer token
#   ray exec deploy/serve-cluster.yaml "serve deploy ~/serve_config.yaml"
"""


def serve_cluster_config(cluster: dict) -> dict:
    """cluster.yaml turned into the Serve endpoint's cluster (see :data:`SERVE_CONFIG_HEADER`). The token reaches the
    nodes as a file named by ``RAY_APP_API_TOKEN_FILE`` in the environment of ``ray start``, never a runtime_env."""
    serve = json.loads(json.dumps(cluster))
    serve["cluster_name"] = f"{cluster['cluster_name']}-serve"
    head = serve["available_node_types"][serve["head_node_type"]]
    head["node_config"]["InstanceType"] = SERVE_HEAD_INSTANCE
    serve["available_node_types"] = {
        name: t
        for name, t in serve["available_node_types"].items()
        if name == serve["head_node_type"] or "spot_cpu" in t.get("resources", {})
    }
    serve["initialization_commands"] = [c for c in serve["initialization_commands"] if "shutdown" not in c]
    # The batch cluster's CloudWatch alarms (a node up 13 h, the job failure share) do not fit an always-on endpoint.
    serve["provider"].pop("cloudwatch", None)
    serve["file_mounts"] = {"~/ray-app-token": "~/.ray-app-token", "~/serve_config.yaml": "serve_config.yaml"}
    token = "export RAY_APP_API_TOKEN_FILE=$HOME/ray-app-token; "
    serve["head_start_ray_commands"] = [
        token + c if "ray start" in c else c for c in serve["head_start_ray_commands"] if "ray_app.ops.deadman" not in c
    ]
    serve["worker_start_ray_commands"] = [
        token + c if "ray start" in c else c for c in serve["worker_start_ray_commands"]
    ]
    return serve


class Launcher(ABC):
    """Brings a cluster up, runs commands on its head, and takes it down again."""

    #: How the head calls Ray's CLI and the project's Python.
    ray: str = "ray"
    python: str = "python"

    def address_args(self) -> list[str]:
        """What ``ray job ...`` on the head needs to find the job API (the default address on a real head)."""
        return []

    @abstractmethod
    def up(self) -> None: ...

    @abstractmethod
    def run(self, argv: Sequence[str]) -> int:
        """Run a command on the head, its output streamed here; returns its exit status."""

    @abstractmethod
    def down(self) -> None:
        """Remove every node this launcher made, head included."""


class AwsLauncher(Launcher):
    """``cluster.yaml`` on AWS through Ray's cluster launcher SDK (the calls behind ``ray up``, ``ray exec`` and
    ``ray down``)."""

    def __init__(self, config: str | Path | dict = CLUSTER_YAML):
        """``config``: a cluster.yaml's path, or its contents (e.g. with CloudWatch added)."""
        self.config = config if isinstance(config, dict) else str(config)

    def up(self) -> None:
        from ray.autoscaler import sdk

        sdk.create_or_update_cluster(self.config, no_restart=False, restart_only=False, no_config_cache=True)

    def run(self, argv: Sequence[str]) -> int:
        import click
        from ray.autoscaler import sdk

        try:
            sdk.run_on_cluster(self.config, cmd=shlex.join(argv))
        except click.ClickException:  # the launcher reports a failed remote command this way, status and all
            return 1
        return 0

    def down(self) -> None:
        from ray.autoscaler import sdk

        sdk.teardown_cluster(self.config)


# ------------------------------------------------------------------------------------------ local rehearsal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_multinode_config(
    cluster: dict, gcs_port: int, max_workers_per_type: int = 1, idle_timeout_minutes: float = 0.1
) -> dict:
    """cluster.yaml's node types and labels on Ray's fake multinode provider, sized for one machine: one CPU (and
    one GPU for the GPU types) per worker, at most ``max_workers_per_type`` of each type."""
    head_type = cluster["head_node_type"]
    if head_type != "ray.head.default":
        raise ValueError("Ray's fake multinode provider knows only the head type name 'ray.head.default'")
    types: dict[str, dict] = {
        head_type: {
            "resources": dict(cluster["available_node_types"][head_type]["resources"]),
            "node_config": {},
            "max_workers": 0,
        }
    }
    for name, node_type in cluster["available_node_types"].items():
        if name == head_type:
            continue
        resources = {**node_type["resources"], "CPU": 1, "object_store_memory": 100 * 1024**2}
        if "spot_gpu" in node_type["resources"]:
            resources["GPU"] = 1
        types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": node_type.get("min_workers", 0),
            "max_workers": max_workers_per_type,
        }
    return {
        "cluster_name": f"{cluster['cluster_name']}-local",
        "max_workers": (len(types) - 1) * max_workers_per_type,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "head_node_type": head_type,
        "available_node_types": types,
        **{
            k: []
            for k in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (a cluster's temp dir names all of its processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


class LocalLauncher(Launcher):
    """``cluster.yaml``'s node types on Ray's fake multinode provider on this machine, listening on loopback only.

    The head runs detached from this process, with the dead-man's switch beside it whose action stops the head
    (``ray start --block`` then ends every process of the cluster): killing this process leaves a cluster that
    still ends by itself. ``head_cpus`` is what the head advertises (cluster.yaml's head: 0, so fetch and write
    tasks need worker nodes too).
    """

    ray = str(Path(sys.executable).with_name("ray"))
    python = sys.executable

    def __init__(
        self,
        cluster_yaml: str | Path = CLUSTER_YAML,
        *,
        head_cpus: int = 0,
        max_workers_per_type: int = 1,
        idle_s: float = 60,
        max_lifetime_s: float = 3600,
        env: Mapping[str, str] | None = None,
    ):
        self.cluster = yaml.safe_load(Path(cluster_yaml).read_text())
        self.head_cpus = head_cpus
        self.max_workers_per_type = max_workers_per_type
        self.idle_s, self.max_lifetime_s = idle_s, max_lifetime_s
        self.base_env = dict(os.environ if env is None else env)
        self.temp_dir = ""
        self.dashboard = ""
        self.head: subprocess.Popen | None = None
        self.deadman: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**self.base_env, "RAY_ADDRESS": self.dashboard}

    def address_args(self) -> list[str]:
        return ["--address", self.dashboard]

    def node_types(self) -> dict:
        """The cluster as it will run here (one-CPU stand-ins for cluster.yaml's workers): what a job is sized by."""
        from ray.autoscaler._private.util import prepare_config

        return fake_multinode_config(prepare_config(self.cluster), 0, self.max_workers_per_type)

    def up(self) -> None:
        from ray.autoscaler._private.util import prepare_config

        self.temp_dir = tempfile.mkdtemp(prefix="rayapp-", dir="/tmp")  # short: Ray's socket paths must fit
        gcs_port, dash_port = free_port(), free_port()
        fake_yaml = Path(self.temp_dir) / "fake-cluster.yaml"
        fake_yaml.write_text(
            yaml.safe_dump(fake_multinode_config(prepare_config(self.cluster), gcs_port, self.max_workers_per_type))
        )
        env = {
            **self.base_env,
            "RAY_FAKE_CLUSTER": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
        env.pop("RAY_ADDRESS", None)
        self.head = self._spawn("head.log", self._head_command(gcs_port, dash_port, fake_yaml), env)
        self.dashboard = f"http://127.0.0.1:{dash_port}"
        self.base_env = {k: v for k, v in env.items() if k != "RAY_FAKE_CLUSTER"}
        self._wait_for_dashboard()
        self.deadman = self._spawn("deadman.log", self._deadman_command(self.head.pid), self.base_env)
        print(f"local cluster up: {self.dashboard} (logs in {self.temp_dir})", flush=True)

    def _spawn(self, log_name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """A process in its own session, its output in ``log_name`` under the cluster's temp dir."""
        with open(Path(self.temp_dir) / log_name, "wb") as log:
            return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _head_command(self, gcs_port: int, dash_port: int, fake_yaml: Path) -> list[str]:
        """``ray start --head`` on free ports, with the fake multi-node autoscaler config."""
        ports = [
            f"--{name}={free_port()}"
            for name in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
                "ray-client-server-port",
            )
        ]
        return [
            self.ray,
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            f"--num-cpus={self.head_cpus}",
            f"--object-store-memory={200 * 1024**2}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            *ports,
            "--disable-usage-stats",
            f"--autoscaling-config={fake_yaml}",
            f"--temp-dir={self.temp_dir}",
        ]

    def _deadman_command(self, head_pid: int) -> list[str]:
        """The dead man's switch that stops the head once the cluster is idle or past its lifetime."""
        return [
            self.python,
            "-m",
            "ray_app.ops.deadman",
            "--dashboard",
            self.dashboard,
            "--idle-seconds",
            str(self.idle_s),
            "--max-seconds",
            str(self.max_lifetime_s),
            "--poll-seconds",
            "1",
            "--",
            "kill",
            "-TERM",
            str(head_pid),
        ]

    def _wait_for_dashboard(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.head is None or self.head.poll() is not None:
                raise RuntimeError(f"the local head exited; see {self.temp_dir}/head.log")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local head's job API did not answer in {timeout:.0f} s")
            time.sleep(0.5)

    def run(self, argv: Sequence[str]) -> int:
        return subprocess.run(list(argv), env=self.env, check=False).returncode

    def down(self) -> None:
        for proc in (self.deadman, self.head):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.temp_dir:
            deadline = time.monotonic() + 30
            while processes_mentioning(self.temp_dir) and time.monotonic() < deadline:
                time.sleep(0.5)
            for pid in processes_mentioning(self.temp_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        print("local cluster down", flush=True)


# -------------------------------------------------------------------------------------------------- the job


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def run_job(
    launcher: Launcher, batch_argv: Sequence[str], *, job_id: str, env: Mapping[str, str], keep: bool = False
) -> int:
    """Up, the batch job as Ray job ``job_id`` (its logs streamed here), down; returns the job's exit status
    (130 when interrupted). ``keep`` leaves the cluster up for another job (the dead-man's switch still ends it)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    try:
        launcher.up()
        return launcher.run(
            [
                launcher.ray,
                "job",
                "submit",
                *launcher.address_args(),
                "--submission-id",
                job_id,
                "--runtime-env-json",
                json.dumps({"env_vars": dict(env)}),
                "--",
                launcher.python,
                "-m",
                "ray_app.adapters.cli",
                "batch",
                "--job-id",
                job_id,
                *batch_argv,
            ]
        )
    except KeyboardInterrupt:
        print(f"interrupted: stopping job {job_id}, then the cluster", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            launcher.run([launcher.ray, "job", "stop", *launcher.address_args(), job_id])
        return 130
    finally:
        if not keep:
            launcher.down()


if __name__ == "__main__" and sys.argv[1:] == ["serve-config"]:
    print(
        SERVE_CONFIG_HEADER
        + yaml.safe_dump(serve_cluster_config(yaml.safe_load(CLUSTER_YAML.read_text())), sort_keys=False, width=120),
        end="",
    )
