"""One scan through the model, with no Ray, HTTP or cloud in it: segment it and build its passport.

The CLI, the Ray Data batch job and the Serve endpoint are thin adapters over these functions, so a passport
computed by any of them for the same scan and weights is the same document.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_app.core import passport, stages
from ray_app.core.errors import RayAppError
from ray_app.core.scan import Scan
from ray_app.core.segmenter import Segmenter
from ray_app.core.totalseg import TaskSpec
from ray_app.settings import Settings


@dataclass
class ScanResult:
    """The outcome for one scan: a passport always, a mask only when segmentation succeeded."""

    scan_id: str
    passport: dict[str, Any]
    mask: np.ndarray | None = None
    scan: Scan | None = None
    locations: dict[str, str] = field(default_factory=dict)
    #: What producing and storing it used, for the job summary (``sinks.SUMMARY_SCHEMA``'s last columns): set by
    #: the batch job's segmentation actor (``actor_cpus``, ``actor_gpus``, ``node_cpus``) and by
    #: :func:`write_result` (objects and bytes written, store item size).
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.passport.get("status") == "ok"


def failure(
    scan_id: str,
    exc: BaseException,
    model: dict[str, Any],
    *,
    source_uri: str | None = None,
    timings: dict[str, float] | None = None,
) -> ScanResult:
    """The result of a scan that failed with ``exc`` (read through :func:`ray_app.core.errors.describe`)."""
    doc = passport.failure_passport(scan_id, exc, model, source_uri=source_uri, timings=timings or {})
    return ScanResult(scan_id, doc)


def segment_scan(
    segmenter: Segmenter, scan: Scan, *, settings: Settings | None = None, timings: dict[str, float] | None = None
) -> ScanResult:
    """Segment a validated scan in this process (all stages) and compute its passport; any failure becomes a
    failure passport. ``settings`` (the passport's presence rule) default to the segmenter's own."""
    settings = segmenter.settings if settings is None else settings
    timings = dict(timings or {})
    try:
        t = time.perf_counter()
        result = segmenter.segment(scan.image)
        timings.update(result.timings)
        timings["segment_s"] = time.perf_counter() - t
        mask = np.asanyarray(result.mask.dataobj)
        return with_passport(scan, mask, segmenter.spec, segmenter.model_info, timings, settings)
    except Exception as exc:  # noqa: BLE001 - a failed scan is recorded, the job goes on
        return _recorded_failure(scan, exc, segmenter.model_info, timings)


def finish_scan(
    spec: TaskSpec,
    scan: Scan,
    prepared: stages.Prepared | None,
    labels: np.ndarray | None,
    model: dict[str, Any],
    timings: dict[str, float],
    settings: Settings,
) -> ScanResult:
    """The batch job's last stage for a segmented scan: its mask on the scan's grid, then its passport."""
    timings = dict(timings)
    try:
        t = time.perf_counter()
        mask = stages.finish(spec, prepared, labels, scan.shape, stages.memory_order(scan.image))
        timings["resample_out_s"] = time.perf_counter() - t
        return with_passport(scan, mask, spec, model, timings, settings)
    except Exception as exc:  # noqa: BLE001 - a failed scan is recorded, the job goes on
        return _recorded_failure(scan, exc, model, timings)


def with_passport(
    scan: Scan, mask: np.ndarray, spec: TaskSpec, model: dict[str, Any], timings: dict[str, float], settings: Settings
) -> ScanResult:
    """The result of a segmented scan: its mask and passport (timed as ``passport_s``)."""
    t = time.perf_counter()
    doc = passport.build_passport(
        scan, mask, label_map=spec.output_labels, model=model, timings=timings, settings=settings
    )
    doc["timings"]["passport_s"] = time.perf_counter() - t
    return ScanResult(scan.scan_id, doc, mask, scan)


def _recorded_failure(scan: Scan, exc: Exception, model: dict[str, Any], timings: dict[str, float]) -> ScanResult:
    if not isinstance(exc, RayAppError):
        traceback.print_exc()
    return failure(scan.scan_id, exc, model, source_uri=scan.source_uri, timings=timings)
