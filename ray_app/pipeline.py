"""One scan, start to finish, with no Ray in it: segment, build the passport, write the results.

The CLI, the Ray Data batch job and the Serve endpoint are thin adapters over these functions, so a passport
computed by any of them for the same scan and weights is the same document.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from ray_app import outputs, passport
from ray_app.errors import DicomSegUnavailable, RayAppError
from ray_app.scan import Scan
from ray_app.segmenter import Segmenter
from ray_app.settings import Settings, get_settings
from ray_app.sinks import (
    LARGE_OBJECT_BYTES,
    ArtifactSink,
    PassportStore,
    dynamodb_item,
    index_item_bytes,
    item_bytes,
)


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
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc))


def failure(scan_id: str, exc: BaseException, model: dict, *, source_uri: str | None = None,
            timings: dict | None = None) -> ScanResult:
    code, message = error_fields(exc)
    doc = passport.failure_passport(scan_id, code=code, message=message, model=model, source_uri=source_uri,
                                    timings=timings or {})
    return ScanResult(scan_id, doc)


def segment_scan(segmenter: Segmenter, scan: Scan, *, settings: Settings | None = None,
                 timings: dict | None = None) -> ScanResult:
    """Segment a validated scan and compute its passport; any failure becomes a failure passport."""
    settings = settings or get_settings()
    timings = dict(timings or {})
    try:
        t = time.perf_counter()
        result = segmenter.segment(scan.image)
        timings.update(result.timings)
        timings["segment_s"] = time.perf_counter() - t
        mask = np.asanyarray(result.mask.dataobj)
        t = time.perf_counter()
        doc = passport.build_passport(scan, mask, label_map=segmenter.spec.output_labels,
                                      model=segmenter.model_info, timings=timings, settings=settings)
        doc["timings"]["passport_s"] = time.perf_counter() - t
        return ScanResult(scan.scan_id, doc, mask, scan)
    except Exception as exc:  # noqa: BLE001 - a failed scan is recorded, the job goes on
        if not isinstance(exc, RayAppError):
            traceback.print_exc()
        return failure(scan.scan_id, exc, segmenter.model_info, source_uri=scan.source_uri, timings=timings)


def write_result(result: ScanResult, sink: ArtifactSink, store: PassportStore | None, job_id: str, *,
                 label_map: dict[int, str], preview: bool = False, per_structure: bool = False) -> ScanResult:
    """Write mask, extras and passport JSON, then the passport store entry last.

    The store entry is what marks a scan done for resume, so it is written only once every file is in place;
    a crash in between leaves a scan that is simply redone, never one that looks done and is not.
    """
    key = result.passport["model"]["key"]
    sizes: list[int] = []

    def put(name: str, data: bytes, content_type: str) -> str:
        uri = sink.put(result.scan_id, key, name, data, content_type)
        sizes.append(len(data))
        return uri

    t = time.perf_counter()
    if result.ok and result.mask is not None and result.scan is not None:
        locs = result.locations
        locs["mask"] = put("mask.nii.gz", outputs.mask_to_nifti_bytes(result.mask, result.scan), "application/gzip")
        if per_structure:
            locs["segmentations"] = put(outputs.SEGMENTATIONS_ZIP,
                                        outputs.per_structure_zip(result.mask, result.scan, label_map),
                                        "application/zip")
        if preview:
            locs["preview"] = put("preview.png", outputs.preview_png(result.scan, result.mask, label_map), "image/png")
        if result.scan.dicom is not None:
            try:
                seg = outputs.dicom_seg_bytes(result.scan, result.mask, label_map, model=result.passport["model"])
            except DicomSegUnavailable as exc:  # the mask and passport are still good
                result.passport.setdefault("warnings", []).append(f"no DICOM-SEG: {exc.message}")
            else:
                locs["dicom_seg"] = put("seg.dcm", seg, "application/dicom")
        result.passport["outputs"] = dict(locs)
    result.passport["timings"]["write_s"] = time.perf_counter() - t
    result.locations["passport"] = put("passport.json", json.dumps(result.passport, indent=1).encode(),
                                       "application/json")
    large = [n for n in sizes if n > LARGE_OBJECT_BYTES]
    result.usage.update(objects_written=len(sizes), bytes_written=sum(sizes), large_objects_written=len(large),
                        large_bytes_written=sum(large))
    # The item a DynamoDB store writes for this passport, sized with the store's own function whichever store
    # this is: the cost report prices DynamoDB. (An id no store accepts is the store's error to raise, below.)
    try:
        item = dynamodb_item(result.passport, job_id, result.locations["passport"])
    except RayAppError:
        pass
    else:
        result.usage.update(store_item_bytes=item_bytes(item), store_index_bytes=index_item_bytes(item))
    if store is not None:
        store.put(result.passport, job_id, passport_uri=result.locations["passport"])
    return result


#: The summary columns :attr:`ScanResult.usage` fills.
USAGE_COLUMNS = ("actor_cpus", "actor_gpus", "node_cpus", "objects_written", "bytes_written", "large_objects_written",
                 "large_bytes_written", "store_item_bytes", "store_index_bytes")


def summary_row(doc: dict, job_id: str, locations: dict | None = None, usage: dict | None = None) -> dict:
    """One flat row of the job summary (``sinks.SUMMARY_SCHEMA``: Parquet, Athena-queryable)."""
    usage = usage or {}
    structures = doc.get("structures") or {}
    error = doc.get("error") or {}
    timings = doc.get("timings") or {}
    locations = locations or {}

    def volume(name: str):
        return (structures.get(name) or {}).get("volume_ml")

    return {
        "job_id": job_id,
        "scan_id": doc["scan_id"],
        "model_key": doc["model"]["key"],
        "status": doc["status"],
        "error_code": error.get("code"),
        "error": error.get("message"),
        "input_uri": (doc.get("scan") or {}).get("source_uri"),
        "mask_uri": locations.get("mask"),
        "passport_uri": locations.get("passport"),
        "finished_at": doc.get("created_at"),
        **{f"{k}_s": timings.get(f"{k}_s") for k in ("read", "segment", "passport", "write", "total")},
        "structures_present": sum(1 for s in structures.values() if s.get("present")),
        **{f"{name}_ml": volume(name) for name in ("liver", "spleen", "kidney_left", "kidney_right", "pancreas")},
        **{k: usage.get(k) for k in USAGE_COLUMNS},
    }
