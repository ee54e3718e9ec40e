"""The head's dead-man's switch: a job-scoped cluster that nobody ends still ends.

``ray-app cluster run`` tears the cluster down itself when its job ends. This process covers the cases where
nobody is left to do that (a laptop closed mid-job, an SSH session lost, a crash of the starting process): it
runs on the head beside Ray, asks Ray's job API whether any job is pending or running, and runs its ``action``
(on AWS: ``ray down ~/ray_bootstrap_config.yaml --yes``, Ray's own teardown, which removes the workers and then
the head) once

- no job has been pending or running for ``idle`` seconds (a head whose Ray does not answer counts as idle), or
- the head has lived ``max_lifetime`` seconds, whatever runs: the cap on a job that hangs.

cluster.yaml starts it from ``head_start_ray_commands``; the host's own ``shutdown -h +MINUTES`` (with
``InstanceInitiatedShutdownBehavior: terminate``) backs it up should the head's container be wedged.

    python -m ray_app.ops.deadman --idle-minutes 15 --max-hours 12 -- ray down ~/ray_bootstrap_config.yaml --yes
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("ray_app.deadman")

BUSY = {"PENDING", "RUNNING"}


@dataclass(frozen=True)
class Limits:
    idle_s: float
    max_lifetime_s: float
    poll_s: float = 30.0


def jobs_busy(dashboard: str) -> bool:
    """True while any job on the cluster is pending or running; False when none is, or Ray does not answer."""
    from ray.job_submission import JobSubmissionClient

    try:
        jobs = JobSubmissionClient(dashboard).list_jobs()
    except Exception as exc:  # noqa: BLE001 - a head that cannot list its jobs runs none that anyone can watch
        log.info("job API not answering (%s: %s): counted as idle", type(exc).__name__, exc)
        return False
    return any(str(job.status) in BUSY for job in jobs)


def watch(
    busy: Callable[[], bool],
    limits: Limits,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll ``busy`` until a limit is reached; returns why (``"idle"`` or ``"max_lifetime"``)."""
    started = idle_since = clock()
    while True:
        now = clock()
        if now - started >= limits.max_lifetime_s:
            return "max_lifetime"
        if busy():
            idle_since = clock()
        elif clock() - idle_since >= limits.idle_s:
            return "idle"
        sleep(limits.poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ray_app.ops.deadman", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265", help="the head's job API")
    idle = parser.add_mutually_exclusive_group()
    idle.add_argument("--idle-minutes", type=float, default=15.0)
    idle.add_argument("--idle-seconds", type=float, help="for rehearsals on a local cluster")
    life = parser.add_mutually_exclusive_group()
    life.add_argument("--max-hours", type=float, default=12.0)
    life.add_argument("--max-seconds", type=float, help="for rehearsals on a local cluster")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument("action", nargs="+", help="the command that ends the cluster (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s deadman %(message)s")

    limits = Limits(
        idle_s=args.idle_seconds if args.idle_seconds is not None else args.idle_minutes * 60,
        max_lifetime_s=args.max_seconds if args.max_seconds is not None else args.max_hours * 3600,
        poll_s=args.poll_seconds,
    )
    log.info(
        "armed: idle %.0f s, max lifetime %.0f s, action %s",
        limits.idle_s,
        limits.max_lifetime_s,
        " ".join(args.action),
    )
    reason = watch(lambda: jobs_busy(args.dashboard), limits)
    log.info("fired (%s): running %s", reason, " ".join(args.action))
    return subprocess.run(args.action, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
