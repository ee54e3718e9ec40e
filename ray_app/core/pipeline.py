"""One scan through the model, with no Ray, HTTP or cloud in it: segment it and build its passport.

The CLI, the Ray Data batch job and the Serve endpoint are thin adapters over these functions, so a passport
computed by any of them for the same scan and weights is the same document.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from ray_app.core import passport, stages
from ray_app.core.errors import RayAppError
from ray_app.core.scan import Scan
from ray_app.core.segmenter import Segmenter
from ray_app.core.totalseg import TaskSpec
from ray_app.settings import Settings, get_settings


@dataclass
class ScanResult:
    """The outcome for one scan: a passport always, a mask only when segmentation succeeded."""

    scan_id: str
    passport: dict
    mask: np.ndarray | None = None
    scan: Scan | None = None
    locations: dict[str, str] = field(default_factory=dict)
    #: What producing and storing it used, for the job summary (``sinks.SUMMARY_SCHEMA``'s last columns): set by
    #: the batch job's segmentation actor (``actor_cpus``, ``actor_gpus``, ``node_cpus``) and by
    #: :func:`write_result` (objects and bytes written, store item size).
    usage: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.passport.get("status") == "ok"


#: The code of a scan that needed more memory than its worker has (Serve answers it with 503).
OUT_OF_MEMORY = "out_of_memory"


def error_fields(exc: BaseException) -> tuple[str, str]:
    """A stable code and a message for failure records; unexpected errors keep their type name."""
    if isinstance(exc, RayAppError):
        return exc.code, exc.message
    if isinstance(exc, MemoryError) or _is_torch_oom(exc):
        return OUT_OF_MEMORY, "the scan needed more memory than the worker has"
    return "internal_error", f"{type(exc).__name__}: {exc}"


def _is_torch_oom(exc: BaseException) -> bool:
    """torch reports exhausted memory as ``torch.OutOfMemoryError`` (GPU) or a plain RuntimeError from its CPU
    allocator, not as MemoryError."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


def failure(
    scan_id: str, exc: BaseException, model: dict, *, source_uri: str | None = None, timings: dict | None = None
) -> ScanResult:
    code, message = error_fields(exc)
    doc = passport.failure_passport(
        scan_id, code=code, message=message, model=model, source_uri=source_uri, timings=timings or {}
    )
    return ScanResult(scan_id, doc)


def segment_scan(
    segmenter: Segmenter, scan: Scan, *, settings: Settings | None = None, timings: dict | None = None
) -> ScanResult:
    """Segment a validated scan in this process (all stages) and compute its passport; any failure becomes a
    failure passport."""
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
    model: dict,
    timings: dict,
    settings: Settings | None = None,
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
    scan: Scan, mask: np.ndarray, spec: TaskSpec, model: dict, timings: dict, settings: Settings | None
) -> ScanResult:
    """The result of a segmented scan: its mask and passport (timed as ``passport_s``)."""
    t = time.perf_counter()
    doc = passport.build_passport(
        scan, mask, label_map=spec.output_labels, model=model, timings=timings, settings=settings or get_settings()
    )
    doc["timings"]["passport_s"] = time.perf_counter() - t
    return ScanResult(scan.scan_id, doc, mask, scan)


def _recorded_failure(scan: Scan, exc: Exception, model: dict, timings: dict) -> ScanResult:
    if not isinstance(exc, RayAppError):
        traceback.print_exc()
    return failure(scan.scan_id, exc, model, source_uri=scan.source_uri, timings=timings)
