"""The batch job's own metrics through ``ray.util.metrics``, exported on every node's Prometheus endpoint
(``http://<node>:<MetricsExportPort>/metrics``; Ray prefixes each name with ``ray_``):

* ``ray_ray_app_scans_total{job_id, status, error_code}``: scans written, by outcome (``error_code`` empty when
  ok);
* ``ray_ray_app_stage_seconds_bucket{job_id, stage, le}`` (and ``_count``, ``_sum``): seconds per stage of each
  scan, ``stage`` one of ``read_s``, ``segment_s``, ``passport_s``, ``write_s``, ``total_s``.

Recorded by the write stage, once per scan, from the summary row it returns. Ray 2.60 records a histogram
observation at its bucket's midpoint, so ``_sum`` is approximate; the bucket counts are exact.
Only the job id, statuses, error codes and stage names are labels: never a scan id (one series per scan would
swamp Prometheus, and scan ids may be traceable to patients).
"""

from __future__ import annotations

PREFIX = "ray_"  # what Ray puts before a user metric's name on the Prometheus endpoint
SCANS = "ray_app_scans"
STAGE_SECONDS = "ray_app_stage_seconds"
STAGES = ("read_s", "segment_s", "passport_s", "write_s", "total_s")
#: Seconds: a phantom's stages take milliseconds to seconds, a real CT's segmentation minutes on CPU.
BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]

_metrics = None


def _get():
    global _metrics
    if _metrics is None:
        from ray.util.metrics import Counter, Histogram

        _metrics = (
            Counter(
                SCANS,
                description="Scans written by the batch job, by status and error code",
                tag_keys=("job_id", "status", "error_code"),
            ),
            Histogram(
                STAGE_SECONDS,
                description="Seconds per stage of each scan of the batch job",
                boundaries=BOUNDARIES,
                tag_keys=("job_id", "stage"),
            ),
        )
    return _metrics


def record_scan(row: dict) -> None:
    """Count one written scan and observe its stage seconds (a summary row: ``job_id``, ``status``, ``error_code``,
    ``*_s``)."""
    scans, seconds = _get()
    job = str(row.get("job_id") or "")
    scans.inc(
        1,
        tags={
            "job_id": job,
            "status": str(row.get("status") or "unknown"),
            "error_code": str(row.get("error_code") or ""),
        },
    )
    for stage in STAGES:
        value = row.get(stage)
        if value is not None:
            seconds.observe(float(value), tags={"job_id": job, "stage": stage})
