"""The head's dead-man's switch: it ends the cluster after its idle limit and after its maximum lifetime, and never
for idleness while a job runs. Against a real head's job API, with real jobs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_app.ops.deadman import Limits, watch
from tests._ray import ray_head

pytestmark = pytest.mark.timeout(180)


class Clock:
    """Time that moves only when the watcher sleeps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_watch_counts_idleness_from_the_last_busy_poll_and_caps_the_lifetime():
    clock = Clock()
    busy_until = 100.0
    reason = watch(
        lambda: clock.now < busy_until, Limits(idle_s=30, max_lifetime_s=10_000, poll_s=5), clock, clock.sleep
    )
    # polled every 5 s: the last busy poll was at 95, so it fires at 95 + 30, within one poll of 30 s after the end
    assert reason == "idle" and busy_until + 30 - 5 <= clock.now <= busy_until + 30

    clock = Clock()
    reason = watch(lambda: True, Limits(idle_s=30, max_lifetime_s=600, poll_s=5), clock, clock.sleep)
    assert reason == "max_lifetime" and 600 <= clock.now < 605, "a job that never ends still ends at the cap"


def _deadman(dashboard: str, marker: Path, *limits: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray_app.ops.deadman",
            "--dashboard",
            dashboard,
            *limits,
            "--poll-seconds",
            "0.5",
            "--",
            "touch",
            str(marker),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _fired_at(proc: subprocess.Popen, marker: Path, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            return time.monotonic()
        time.sleep(0.2)
    return None


@pytest.mark.slow
def test_the_switch_waits_for_a_running_job_then_fires_when_idle_and_the_cap_fires_regardless(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    with ray_head(num_cpus=1) as head:
        client = JobSubmissionClient(head["dashboard"])
        job = client.submit_job(entrypoint="python -c 'import time; time.sleep(20)'")
        deadline = time.monotonic() + 60
        while client.get_job_status(job) != JobStatus.RUNNING:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)

        idle, capped = tmp_path / "idle-fired", tmp_path / "cap-fired"
        idle_proc = _deadman(head["dashboard"], idle, "--idle-seconds", "3", "--max-seconds", "600")
        cap_proc = _deadman(head["dashboard"], capped, "--idle-seconds", "600", "--max-seconds", "5")
        started = time.monotonic()
        try:
            cap_at = _fired_at(cap_proc, capped, 30)
            assert cap_at is not None and cap_at - started >= 5, "the cap fires while the job still runs"
            assert client.get_job_status(job) == JobStatus.RUNNING
            assert not idle.exists(), "fired for idleness while a job ran"

            while not client.get_job_status(job).is_terminal():
                assert not idle.exists(), "fired for idleness while a job ran"
                time.sleep(0.2)
            ended = time.monotonic()
            idle_at = _fired_at(idle_proc, idle, 30)
            assert idle_at is not None, "did not fire once the cluster was idle"
            # idle 3 s, counted from its last busy poll (every 0.5 s): 2.5 s after we saw the end at the earliest
            assert 2 <= idle_at - ended <= 3 + 5, f"fired {idle_at - ended:.1f} s after the job ended"
        finally:
            for proc in (idle_proc, cap_proc):
                proc.kill()
                proc.wait()
        assert "fired (max_lifetime)" in cap_proc.stdout.read()
        assert "fired (idle)" in idle_proc.stdout.read()


@pytest.mark.slow
def test_a_head_whose_ray_is_gone_counts_as_idle(tmp_path):
    marker = tmp_path / "fired"
    proc = _deadman("http://127.0.0.1:9", marker, "--idle-seconds", "2", "--max-seconds", "600")
    try:
        assert _fired_at(proc, marker, 20) is not None
    finally:
        proc.kill()
        proc.wait()
