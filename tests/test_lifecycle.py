"""The job-scoped cluster's whole lifecycle, rehearsed through ``ray-app cluster run --local``: Ray's fake multinode
provider stands in for EC2 (a real head, autoscaler, job API and a raylet per worker node); nothing else is
stood in for. Every run must leave no Ray process and no node behind: after an interrupted job, its resumption,
a failed job, and a job whose starting process was killed (the head's dead-man's switch ends that one)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_app.ops.cluster import processes_mentioning
from ray_app.storage.sinks import open_passport_store, read_summary
from tests._scan_factory import small_phantom

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

RAY_APP = str(Path(sys.executable).with_name("ray-app"))
MODEL = "total_fast"


def _manifest(folder: Path, ids: list[str], truncated: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["scan_id,uri"]
    for i, sid in enumerate(ids):
        (folder / f"{sid}.nii.gz").write_bytes(small_phantom(300 + i))
        lines.append(f"{sid},{folder / f'{sid}.nii.gz'}")
    if truncated:
        (folder / "cut.nii.gz").write_bytes(small_phantom(399)[:2000])
        lines.append(f"cut,{folder / 'cut.nii.gz'}")
    manifest = folder / f"manifest-{len(ids)}.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """One ``ray-app cluster run --local`` in the background, its output in a file."""

    def __init__(self, tmp: Path, name: str, manifest: Path, out: Path, *extra: str, env: dict | None = None):
        self.log = tmp / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    RAY_APP,
                    "cluster",
                    "run",
                    "--local",
                    "--head-cpus",
                    "1",
                    *extra,
                    "--",
                    "--manifest",
                    str(manifest),
                    "--output",
                    str(out),
                    "--max-actors",
                    "1",
                ],
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                # As from a terminal: a suite started in the background (`.ci/run &`) passes SIGINT on ignored,
                # and the Ctrl-C this test sends would never arrive.
                preexec_fn=_sigint_as_from_a_terminal,
            )

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def temp_dir(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not (found := re.search(r"logs in (/tmp/rayapp-\w+)", self.text)):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text[-3000:]
            time.sleep(0.5)
        return found.group(1)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(self.text[-3000:]) from None


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def _done(out: Path) -> list[str]:
    return sorted(p.parent.parent.name for p in out.glob(f"*/{MODEL}/mask.nii.gz"))


def _nothing_left(temp_dir: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], f"Ray processes of the cluster outlived it: {left}"


def test_interrupted_job_stops_and_tears_down_then_the_same_command_resumes_the_rest(tmp_path, phantom_weights):
    ids = [f"scan-{i}" for i in range(10)]  # a second or two each: the job outlasts the interruption
    manifest, out = _manifest(tmp_path / "in", ids), tmp_path / "out"
    env = {"TOTALSEG_WEIGHTS_PATH": str(phantom_weights)}

    first = Run(tmp_path, "interrupted", manifest, out, env=env)
    temp_dir = first.temp_dir()
    _wait(lambda: _done(out), 240, "the first mask")
    first.proc.send_signal(signal.SIGINT)
    assert first.wait() == 130, first.text[-3000:]
    _nothing_left(temp_dir)
    done_before = _done(out)
    assert 0 < len(done_before) < len(ids), f"the job was not interrupted mid-way: {done_before}"

    second = Run(tmp_path, "resumed", manifest, out, env=env)
    temp_dir = second.temp_dir()
    assert second.wait() == 0, second.text[-3000:]
    _nothing_left(temp_dir)
    assert _done(out) == ids
    # No actor options given: cluster run sized the actors for cluster.yaml's workers (here their one-CPU
    # stand-ins), leaving their node room for the CPU-stage tasks, and the job ran with that shape.
    shape = "--actor-resource spot_cpu=1 --cpus-per-actor 0.8"
    assert f"shape: {shape} (for cluster.yaml's workers" in second.text
    assert re.search(rf"^Running entrypoint .* batch .*{shape}$", second.text, re.M), second.text[-3000:]
    job_id = re.search(r"^job (job-\S+)", second.text, re.M).group(1)
    summary = read_summary(str(out / "_jobs" / job_id / "summary.parquet"))
    assert sorted(r["scan_id"] for r in summary if r["status"] == "skipped") == done_before
    assert sorted(r["scan_id"] for r in summary if r["status"] == "ok") == sorted(set(ids) - set(done_before))


def test_a_failed_job_tears_the_cluster_down_and_exits_non_zero(tmp_path, phantom_weights):
    """The preflight here cannot see the nodes' weights; the job's own preflight on the head can, and fails fast."""
    manifest, out = _manifest(tmp_path / "in", ["scan-0"]), tmp_path / "out"
    run = Run(
        tmp_path,
        "failed",
        manifest,
        out,
        env={"TOTALSEG_WEIGHTS_PATH": str(tmp_path / "no-weights"), "RAY_APP_DOWNLOAD_WEIGHTS": "false"},
    )
    temp_dir = run.temp_dir()
    assert run.wait() == 1, run.text[-3000:]
    _nothing_left(temp_dir)
    assert "preflight_failed: model weights Dataset297" in run.text
    assert _done(out) == []


def test_a_killed_starter_leaves_a_cluster_that_finishes_its_job_and_ends_itself(tmp_path, phantom_weights):
    ids = ["scan-a", "scan-b"]
    manifest, out = _manifest(tmp_path / "in", ids, truncated=True), tmp_path / "out"
    run = Run(
        tmp_path, "killed", manifest, out, "--idle-minutes", "0.5", env={"TOTALSEG_WEIGHTS_PATH": str(phantom_weights)}
    )
    temp_dir = run.temp_dir()
    _wait(
        lambda: (Path(temp_dir) / "deadman.log").exists() and "armed" in (Path(temp_dir) / "deadman.log").read_text(),
        60,
        "the dead-man's switch",
    )
    _wait(lambda: (out / "passports.sqlite").exists(), 240, "the job to start writing")
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()
    assert processes_mentioning(temp_dir), "the cluster went down with its starter"

    _wait(lambda: not processes_mentioning(temp_dir), 300, "the dead-man's switch to end the cluster")
    _nothing_left(temp_dir)
    shutil.rmtree(temp_dir)  # the logs stay for a post-mortem when nobody tears down
    store = open_passport_store(f"sqlite:///{out / 'passports.sqlite'}")
    assert {sid: store.get(sid, MODEL)["status"] for sid in [*ids, "cut"]} == {
        "scan-a": "ok",
        "scan-b": "ok",
        "cut": "failed",
    }, "the job did not finish on its own"
