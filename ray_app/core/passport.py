"""The anatomical passport: one versioned JSON document per scan with a line for every class of the label map.

Statistics follow TotalSegmentator's ``get_basic_statistics`` (volume = voxel count x product of the header's
voxel sizes; mean HU over the structure's voxels) so its ``statistics.json`` is an oracle, with two deliberate
differences: structures touching the border keep their measured values and get ``incomplete: true`` instead of
being zeroed, and absent structures get ``null`` HU instead of 0. The whole volume is visited a fixed number of
times (one slab-wise pass of ``np.bincount`` and one ``find_objects``), never once per class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from ray_app.core.errors import describe
from ray_app.core.scan import Scan
from ray_app.settings import Settings

SCHEMA_VERSION = "1.0"
#: TotalSegmentator's ``touches_border`` looks at the first and last 3 voxels of every axis.
BORDER_VOXELS = 3
#: Voxels per slab when summing HU per label: bounds the temporaries to a few hundred MB.
CHUNK_VOXELS = 8_000_000


def build_passport(
    scan: Scan,
    mask: np.ndarray | nib.Nifti1Image,
    *,
    label_map: Mapping[int, str],
    model: Mapping[str, Any],
    timings: Mapping[str, float],
    settings: Settings,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """The passport of a segmented scan. ``mask`` holds label ids on the scan's grid.

    The scan's warnings (e.g. a modality let through by ``modality_policy="flag"``) and ``warnings`` are copied
    into the document's ``warnings``.
    """
    labels = np.asanyarray(mask.dataobj) if isinstance(mask, nib.Nifti1Image) else np.asanyarray(mask)
    if labels.shape != scan.shape:
        raise ValueError(f"mask shape {labels.shape} differs from the scan's {scan.shape}")
    if labels.dtype.kind not in "iu" or (labels.dtype.kind == "i" and labels.size and labels.min() < 0):
        raise ValueError(f"mask must hold non-negative integer label ids, not {labels.dtype}")
    ct = np.asanyarray(scan.image.dataobj)
    all_warnings = list(scan.warnings) + list(warnings or [])
    structures, unknown = _structures(ct, labels, scan.affine, _voxel_volume_ml(scan), label_map, settings)
    if unknown:
        all_warnings.append(f"the mask holds label ids absent from the label map: {unknown}")
    lo, hi = scan.intensity_range or (float(ct.min()), float(ct.max()))
    return {
        "schema_version": SCHEMA_VERSION,
        "scan_id": scan.scan_id,
        "status": "ok",
        "created_at": _now(),
        "scan": {
            "scan_id": scan.scan_id,
            "source_uri": scan.source_uri,
            "modality": scan.modality,
            "shape": list(scan.shape),
            "spacing_mm": [round(s, 6) for s in scan.spacing],
            "orientation": "".join(nib.aff2axcodes(scan.affine)),
            "affine": [[round(float(v), 6) for v in row] for row in scan.affine],
            "hu_range": [lo, hi],
            "dicom": scan.dicom is not None,
        },
        "model": dict(model),
        "timings": {k: float(v) for k, v in timings.items()},
        "rules": {"presence_threshold_ml": settings.presence_threshold_ml, "border_voxels": BORDER_VOXELS},
        "structures": structures,
        "warnings": all_warnings,
    }


def failure_passport(
    scan_id: str,
    error: BaseException | None = None,
    model: Mapping[str, Any] | None = None,
    *,
    code: str | None = None,
    message: str | None = None,
    timings: Mapping[str, float] | None = None,
    source_uri: str | None = None,
) -> dict[str, Any]:
    """The passport of a scan that could not be processed: error code and message, no structures.

    Pass the exception, or ``code`` and ``message`` directly. The exception is read through
    :func:`ray_app.core.errors.describe`: a :class:`RayAppError` contributes its stable ``code`` and its message
    (which names no patient data), memory exhaustion becomes ``out_of_memory`` and any other exception
    ``internal_error`` with its type and text.
    """
    if error is not None:
        info = describe(error)
        code, message = info.code, info.message
    if not code or message is None:
        raise ValueError("failure_passport needs an error, or a code and a message")
    return {
        "schema_version": SCHEMA_VERSION,
        "scan_id": scan_id,
        "status": "failed",
        "created_at": _now(),
        "scan": {"scan_id": scan_id, "source_uri": source_uri},
        "model": dict(model or {}),
        "timings": {k: float(v) for k, v in (timings or {}).items()},
        "error": {"code": code, "message": message},
        "structures": {},
        "warnings": [],
    }


def validate_passport(doc: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``doc`` matches the passport schema (and is strict JSON)."""
    json.dumps(doc, allow_nan=False)
    _validator().validate(doc)


def passport_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) shipped in ``ray_app/core/passport.schema.json``."""
    schema: dict[str, Any] = json.loads(resources.files("ray_app.core").joinpath("passport.schema.json").read_text())
    return schema


@lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    schema = passport_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _voxel_volume_ml(scan: Scan) -> float:
    """Product of the header's voxel sizes, as TotalSegmentator computes it, in ml."""
    return float(np.prod(scan.spacing)) / 1000.0


def _structures(
    ct: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    voxel_ml: float,
    label_map: Mapping[int, str],
    settings: Settings,
) -> tuple[dict[str, Any], list[int]]:
    n = int(max(max(label_map, default=0), int(labels.max(initial=0)))) + 1
    counts, sums, squares, index_sums = _label_sums(ct, labels, n)
    safe = np.maximum(counts, 1)
    means = sums / safe
    centroids = (index_sums / safe).T
    stds = np.sqrt(np.maximum(squares / safe - means * means, 0.0))
    boxes = ndimage.find_objects(labels, max_label=n - 1)
    unknown = sorted(int(v) for v in np.flatnonzero(counts[1:]) + 1 if int(v) not in label_map)

    out = {}
    for label_id, name in sorted(label_map.items()):
        count = int(counts[label_id])
        volume_ml = count * voxel_ml
        box = boxes[label_id - 1] if label_id >= 1 else None
        entry: dict[str, Any] = {
            "label": int(label_id),
            "present": volume_ml > settings.presence_threshold_ml,
            "volume_ml": round(volume_ml, 6),
            "voxel_count": count,
            "mean_hu": None,
            "std_hu": None,
            "incomplete": False,
            "bbox_voxels": None,
            "bbox_mm": None,
            "centroid_mm": None,
        }
        if count and box is not None:
            entry["mean_hu"] = round(float(means[label_id]), 4)
            entry["std_hu"] = round(float(stds[label_id]), 4)
            entry.update(_geometry(box, centroids[label_id], labels.shape, affine))
        out[name] = entry
    return out, unknown


def _label_sums(ct: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Per label in one pass: voxel count, sum and sum of squares of HU, and sum of voxel indices per axis.

    Slab by slab, so temporaries stay around CHUNK_VOXELS whatever the volume; float64 sums are exact for
    integer HU and indices at any realistic size.
    """
    counts = np.zeros(n, np.int64)
    sums = np.zeros(n)
    squares = np.zeros(n)
    index_sums = np.zeros((3, n))
    step = max(1, CHUNK_VOXELS // max(1, labels.shape[1] * labels.shape[2]))
    for start in range(0, labels.shape[0], step):
        slab = labels[start : start + step]
        foreground = slab != 0
        ids = slab[foreground]
        values = ct[start : start + step][foreground].astype(np.float64)
        counts += np.bincount(ids, minlength=n)
        sums += np.bincount(ids, weights=values, minlength=n)
        squares += np.bincount(ids, weights=values * values, minlength=n)
        for axis, index in enumerate(np.nonzero(foreground)):
            index_sums[axis] += np.bincount(ids, weights=index + (start if axis == 0 else 0), minlength=n)
    return counts, sums, squares, index_sums


def _geometry(
    box: tuple[slice, ...], centroid_vox: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> dict[str, Any]:
    """Bounding box, border contact (TotalSegmentator's touches_border) and centroid in world mm."""
    start = np.array([s.start for s in box])
    stop = np.array([s.stop for s in box])
    incomplete = bool(np.any(start < BORDER_VOXELS) or np.any(stop > np.array(shape) - BORDER_VOXELS))
    corners = np.array(
        [[i, j, k] for i in (start[0], stop[0] - 1) for j in (start[1], stop[1] - 1) for k in (start[2], stop[2] - 1)],
        dtype=float,
    )
    world = nib.affines.apply_affine(affine, corners)
    return {
        "incomplete": incomplete,
        "bbox_voxels": {"min": start.tolist(), "max": (stop - 1).tolist()},
        "bbox_mm": {
            "min": [round(float(v), 3) for v in world.min(axis=0)],
            "max": [round(float(v), 3) for v in world.max(axis=0)],
        },
        "centroid_mm": [round(float(v), 3) for v in nib.affines.apply_affine(affine, centroid_vox)],
    }
