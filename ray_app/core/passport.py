"""The anatomical passport: one versioned JSON document per scan with a line for every class of the label map.

Statistics follow TotalSegmentator's ``get_basic_statistics`` (volume = voxel count x product of the header's
voxel sizes; mean HU over the structure's voxels) so its ``statistics.json`` is an oracle, with two deliberate
differences: structures touching the border keep their measured values and get ``incomplete: true`` instead of
being zeroed, and absent structures get ``null`` HU instead of 0. The whole volume is visited a fixed number of
times at memory speed (the label runs along its contiguous axis and their HU sums), never once per class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

import nibabel as nib
import numpy as np

from ray_app.core.errors import describe
from ray_app.core.scan import Scan
from ray_app.settings import Settings

SCHEMA_VERSION = "1.0"
#: TotalSegmentator's ``touches_border`` looks at the first and last 3 voxels of every axis.
BORDER_VOXELS = 3


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
    stats = _label_stats(ct, labels, n)
    counts = stats["count"]
    safe = np.maximum(counts, 1)
    means = stats["sum"] / safe
    centroids = (stats["index_sum"] / safe).T
    stds = np.sqrt(np.maximum(stats["square_sum"] / safe - means * means, 0.0))
    unknown = sorted(int(v) for v in np.flatnonzero(counts[1:]) + 1 if int(v) not in label_map)

    out = {}
    for label_id, name in sorted(label_map.items()):
        count = int(counts[label_id])
        volume_ml = count * voxel_ml
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
        if count and label_id >= 1:
            entry["mean_hu"] = round(float(means[label_id]), 4)
            entry["std_hu"] = round(float(stds[label_id]), 4)
            lows, highs = stats["min"][:, label_id], stats["max"][:, label_id]
            box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(lows, highs))
            entry.update(_geometry(box, centroids[label_id], labels.shape, affine))
        out[name] = entry
    return out, unknown


def _label_stats(ct: np.ndarray, labels: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per label: voxel count, sum and sum of squares of HU, sum of voxel indices and bounding box per axis.

    One pass along the slowest axis, a whole slab per step (vectorised, at memory speed): running sums of HU and
    HU squared per column are read only where a run of one label ends or starts along its column (a run's sum is
    the difference of the two), so per-label work follows the run ends, never the voxels, and a slab equal to the
    one before costs one comparison. Sums are exact integers for integer CTs.
    """
    order: Literal["C", "F"] = "F" if ct.flags.f_contiguous and not ct.flags.c_contiguous else "C"
    axes = (2, 0, 1) if order == "F" else (0, 2, 1)  # slowest axis, then the column's fastest and middle axes
    depth = labels.shape[axes[0]]
    lab, val = labels.ravel(order).reshape(depth, -1), ct.ravel(order).reshape(depth, -1)
    acc = _Runs(n, [labels.shape[a] for a in axes], lab.shape[1], val.dtype)
    for z in range(depth + 1):
        acc.step(z, lab[z] if z < depth else None, val[z] if z < depth else None)
    return acc.result(axes)


class _Runs:
    """Running per-column sums along the slowest axis, and per label the sums over the runs closed so far."""

    def __init__(self, n: int, sizes: list[int], width: int, dtype: np.dtype):
        self.n, self.sizes = n, sizes
        exact = dtype in (np.int8, np.uint8, np.int16)  # squares fit int32, sums int64: exact
        self.sq_dtype = np.int32 if exact else np.float64
        self.run = np.zeros(width, np.int64 if exact else np.float64)
        self.run_sq = np.zeros(width, np.int64 if exact else np.float64)
        self.prev = np.zeros(width, np.uint8)
        self.sums = np.zeros((6, n))  # count, HU, HU^2, index along the slow, fast and middle axis
        self.seen = [np.zeros((n, size), bool) for size in sizes]

    def step(self, z: int, cur: np.ndarray | None, values: np.ndarray | None) -> None:
        """Close the runs that end at ``z - 1`` and open those that start at ``z``, then add slab ``z``."""
        cur = np.zeros_like(self.prev) if cur is None else cur
        changed = cur != self.prev
        if changed.any():
            ends = np.flatnonzero(changed & (self.prev != 0))
            starts = np.flatnonzero(changed & (cur != 0))
            self._close(z, self.prev[ends], ends, 1.0)
            self._close(z, cur[starts], starts, -1.0)
            self.prev = cur
        if values is not None:
            self.run += values
            self.run_sq += np.multiply(values, values, dtype=self.sq_dtype)

    def _close(self, z: int, ids: np.ndarray, columns: np.ndarray, sign: float) -> None:
        """Runs ending at ``z - 1`` add their sums up to there; runs starting at ``z`` subtract the same. Weights
        equal for every run of the slab (its count and slow-axis index sums) scale one plain count per label."""
        if not ids.size:
            return
        n = self.n
        runs = np.bincount(ids, minlength=n)
        self.sums[0] += sign * z * runs
        self.sums[3] += sign * (z * (z - 1) // 2) * runs
        self.sums[1] += sign * np.bincount(ids, weights=self.run[columns], minlength=n)
        self.sums[2] += sign * np.bincount(ids, weights=self.run_sq[columns], minlength=n)
        self.seen[0][:, z - 1 if sign > 0 else z] |= runs > 0
        middle, fast = np.divmod(columns, self.sizes[1])
        self.sums[4] += sign * z * np.bincount(ids, weights=fast, minlength=n)
        self.sums[5] += sign * z * np.bincount(ids, weights=middle, minlength=n)
        if sign > 0:  # a column's runs start as often as they end: its coordinates are marked once, at a start
            return
        for seen, coord, size in ((self.seen[1], fast, self.sizes[1]), (self.seen[2], middle, self.sizes[2])):
            seen |= np.bincount(ids.astype(np.intp) * size + coord, minlength=n * size).reshape(n, size) > 0

    def result(self, axes: tuple[int, int, int]) -> dict[str, np.ndarray]:
        stats = {
            "count": np.rint(self.sums[0]).astype(np.int64),
            "sum": self.sums[1],
            "square_sum": self.sums[2],
            "index_sum": np.zeros((3, self.n)),
            "min": np.zeros((3, self.n), np.int64),
            "max": np.zeros((3, self.n), np.int64),
        }
        for k, axis in enumerate(axes):
            stats["index_sum"][axis] = self.sums[3 + k]
            stats["min"][axis] = self.seen[k].argmax(axis=1)
            stats["max"][axis] = self.sizes[k] - 1 - self.seen[k][:, ::-1].argmax(axis=1)
        return stats


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
