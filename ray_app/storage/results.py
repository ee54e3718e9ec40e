"""Writing one scan's results (mask, extras, passport JSON, then the store entry) and its summary row."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from ray_app.core import outputs
from ray_app.core.errors import DicomSegUnavailable, RayAppError
from ray_app.core.pipeline import ScanResult
from ray_app.storage.sinks import (
    LARGE_OBJECT_BYTES,
    ArtifactSink,
    PassportStore,
    dynamodb_item,
    index_item_bytes,
    item_bytes,
)


def write_result(
    result: ScanResult,
    sink: ArtifactSink,
    store: PassportStore | None,
    job_id: str,
    *,
    label_map: dict[int, str],
    preview: bool = False,
    per_structure: bool = False,
) -> ScanResult:
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
        _write_files(result, put, label_map, preview=preview, per_structure=per_structure)
    result.passport["timings"]["write_s"] = time.perf_counter() - t
    result.locations["passport"] = put(
        "passport.json", json.dumps(result.passport, indent=1).encode(), "application/json"
    )
    _record_usage(result, sizes, job_id)
    if store is not None:
        store.put(result.passport, job_id, passport_uri=result.locations["passport"])
    return result


def _write_files(
    result: ScanResult,
    put: Callable[[str, bytes, str], str],
    label_map: dict[int, str],
    *,
    preview: bool,
    per_structure: bool,
) -> None:
    """The mask and the extras asked for (per-structure zip, preview, DICOM-SEG for DICOM input); their
    locations go into ``result.locations`` and the passport's ``outputs``."""
    assert result.mask is not None and result.scan is not None
    locs = result.locations
    locs["mask"] = put("mask.nii.gz", outputs.mask_to_nifti_bytes(result.mask, result.scan), "application/gzip")
    if per_structure:
        locs["segmentations"] = put(
            outputs.SEGMENTATIONS_ZIP,
            outputs.per_structure_zip(result.mask, result.scan, label_map),
            "application/zip",
        )
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


def _record_usage(result: ScanResult, sizes: list[int], job_id: str) -> None:
    """Objects and bytes written (above and below the Glacier size) and the store item's size, for the summary."""
    large = [n for n in sizes if n > LARGE_OBJECT_BYTES]
    result.usage.update(
        objects_written=len(sizes),
        bytes_written=sum(sizes),
        large_objects_written=len(large),
        large_bytes_written=sum(large),
    )
    # The item a DynamoDB store writes for this passport, sized with the store's own function whichever store
    # this is: the cost report prices DynamoDB. (An id no store accepts is the store's error to raise, below.)
    try:
        item = dynamodb_item(result.passport, job_id, result.locations["passport"])
    except RayAppError:
        pass
    else:
        result.usage.update(store_item_bytes=item_bytes(item), store_index_bytes=index_item_bytes(item))


#: The summary columns :attr:`ScanResult.usage` fills.
USAGE_COLUMNS = (
    "actor_cpus",
    "actor_gpus",
    "node_cpus",
    "objects_written",
    "bytes_written",
    "large_objects_written",
    "large_bytes_written",
    "store_item_bytes",
    "store_index_bytes",
)


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
