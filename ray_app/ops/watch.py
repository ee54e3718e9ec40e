"""``ray-app status JOB``: how a running (or finished) batch job is doing, from the passport store alone.

Counts by status and error code, the scan rate from the passports' ``created_at`` and, when the job's size is
known, an ETA. The size is ``--total N``, or read from the job's record ``OUTPUT/_jobs/<job>/job.json`` (written
at start by the batch job's preflight): its manifest's runnable rows, capped by its ``--limit``. Scans an earlier
run already finished are skipped and get no passport in this job, so for a resumed job that size is an upper
bound and the ETA too (say ``--total`` when you know better).

The rate is scans per minute since the job started (``started_at`` of the record) or, without the record,
between its first and last passport. Only scan ids, statuses and error codes are shown.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass
class JobStatus:
    job_id: str
    done: int
    by_status: Counter
    by_error: Counter
    first_at: datetime | None
    last_at: datetime | None
    started_at: datetime | None = None
    total: int | None = None
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def per_minute(self) -> float | None:
        if self.started_at and self.done:
            minutes = (self.now - self.started_at).total_seconds() / 60
            return self.done / minutes if minutes > 0 else None
        if self.done >= 2 and self.first_at and self.last_at and self.last_at > self.first_at:
            return (self.done - 1) / ((self.last_at - self.first_at).total_seconds() / 60)
        return None

    @property
    def eta_minutes(self) -> float | None:
        if self.total is None or not self.per_minute:
            return None
        return max(self.total - self.done, 0) / self.per_minute

    def lines(self) -> list[str]:
        out = [f"job {self.job_id}: {self.done} scans done" + (f" of {self.total}" if self.total is not None else "")]
        out += [f"  {status}: {n}" for status, n in sorted(self.by_status.items())]
        out += [f"    {code}: {n}" for code, n in sorted(self.by_error.items(), key=lambda kv: (-kv[1], kv[0]))]
        if self.per_minute:
            out.append(f"rate: {self.per_minute:.2f} scans/min")
        if self.last_at:
            age = (self.now - self.last_at).total_seconds() / 60
            out.append(f"last passport: {self.last_at:%Y-%m-%d %H:%M:%S} UTC ({age:.1f} min ago)")
        if self.eta_minutes is not None:
            eta = self.now.timestamp() + self.eta_minutes * 60
            out.append(
                f"ETA: {self.eta_minutes:.1f} min ({datetime.fromtimestamp(eta, timezone.utc):%H:%M} UTC)"
                if self.total is None or self.done < self.total
                else "ETA: done"
            )
        elif self.total is None:
            out.append("ETA: unknown (give --total N or --output OUTPUT for the job's record)")
        return out


def job_status(
    job_id: str,
    docs: list[dict],
    *,
    total: int | None = None,
    started_at: datetime | None = None,
    now: datetime | None = None,
) -> JobStatus:
    times = sorted(t for t in (_time(d.get("created_at")) for d in docs) if t)
    errors: Counter[str] = Counter()
    for d in docs:
        if d.get("status") != "ok":
            err = d.get("error")
            errors[(err.get("code") if isinstance(err, dict) else d.get("error_code")) or "unknown"] += 1
    return JobStatus(
        job_id=job_id,
        done=len(docs),
        by_status=Counter(d.get("status") or "?" for d in docs),
        by_error=errors,
        first_at=times[0] if times else None,
        last_at=times[-1] if times else None,
        started_at=started_at,
        total=total,
        now=now or datetime.now(timezone.utc),
    )


def job_record(output: str, job_id: str) -> tuple[int | None, datetime | None]:
    """(size, started_at) from ``OUTPUT/_jobs/<job>/job.json``: the manifest's runnable rows, capped by the limit."""
    from ray_app import storage
    from ray_app.storage.keys import job_file_uri
    from ray_app.storage.manifest import read_manifest

    record = json.loads(storage.read_bytes(job_file_uri(output, job_id, "job.json")))
    size = None
    if record.get("manifest"):
        size = len(read_manifest(record["manifest"]).rows)
        if record.get("limit"):
            size = min(size, int(record["limit"]))
    return size, _time(record.get("started_at"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="the job id")
    p.add_argument("--passports", required=True, help="dynamodb://TABLE or sqlite:///PATH")
    p.add_argument("--total", type=int, help="scans the job will process (for the ETA)")
    p.add_argument("--output", help="the job's --output: its record _jobs/<job>/job.json gives start and size")


def run(args: argparse.Namespace) -> int:
    from ray_app.core.errors import RayAppError
    from ray_app.storage.sinks import open_passport_store

    total, started = args.total, None
    try:
        if args.output:
            size, started = job_record(args.output, args.job)
            total = total if total is not None else size
        docs = open_passport_store(args.passports).list_by_job(args.job)
    except (RayAppError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in job_status(args.job, docs, total=total, started_at=started).lines():
        print(line)
    return 0
