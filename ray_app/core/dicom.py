"""DICOM CT series: validated from their headers (one series, frame of reference, size, orientation and spacing;
slices evenly spaced along the normal, no gaps or duplicates), then decoded.

Geometry comes from highdicom (slice sorting, spacing regularity, affine) and pixels from pydicom (JPEG 2000 via
pylibjpeg); the volume is laid out like dicom2nifti's output: array axes (column, row, slice), slices ascending
along the slice normal, RAS affine.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from ray_app.core.errors import (
    DuplicateSlices,
    EmptyScan,
    MissingSlices,
    MixedSeries,
    NotCT,
    NotVolumetric,
    TooManyVoxels,
    UnreadableScan,
    UnsupportedDtype,
)
from ray_app.core.hounsfield import modality_problem
from ray_app.core.nifti import check_header, check_spacing
from ray_app.settings import Settings


@dataclass
class Series:
    """A decoded series: the image, its datasets in slice order (pixel data dropped), modality and warnings."""

    image: nib.Nifti1Image
    datasets: list[Any]
    modality: str | None
    warnings: list[str] = field(default_factory=list)


def read_series(blobs: Sequence[bytes], scan_id: str, settings: Settings) -> Series:
    """Read one DICOM CT series from file contents: validate the series from its headers, then decode."""
    datasets, warnings = _image_datasets(blobs, scan_id)
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise UnreadableScan(
            "multi-frame (enhanced) DICOM is not supported; send the series as single-frame images", scan_id=scan_id
        )
    _check_single_series(datasets, scan_id)
    modality = str(datasets[0].get("Modality", "") or "") or None
    if modality != "CT":
        modality_problem(
            NotCT(f"the DICOM modality is {modality or 'missing'}, not CT", scan_id=scan_id), settings, warnings
        )
    ordered = _check_volume(datasets, scan_id, settings)
    img, ordered = _decode_series(ordered, scan_id)
    check_header(img.header, scan_id, settings)
    return Series(img, list(ordered), modality, warnings)


def _image_datasets(blobs: Sequence[bytes], scan_id: str) -> tuple[list[Any], list[str]]:
    """The image datasets among the files (headers parsed, pixels not decoded) and a warning for the others."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for blob in blobs:
        if not blob:
            continue
        try:
            ds = pydicom.dcmread(io.BytesIO(blob))
        except InvalidDicomError:
            continue  # not DICOM at all (a README, a NIfTI...): ignored, and counted in a warning
        except Exception as exc:  # pydicom raises many types for a damaged file
            raise UnreadableScan(f"a DICOM file is damaged ({type(exc).__name__})", scan_id=scan_id) from exc
        if "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            datasets.append(ds)
        elif _is_image_storage(ds):  # pydicom stops quietly at a truncation; an image without pixels is one
            raise UnreadableScan("a DICOM image file has no pixel data (truncated or damaged)", scan_id=scan_id)
    if not datasets:
        if not any(blobs):
            raise EmptyScan("the input holds no data", scan_id=scan_id)
        raise UnreadableScan("no DICOM images found in the input", scan_id=scan_id)
    warnings: list[str] = []
    if len(datasets) < sum(1 for b in blobs if b):
        warnings.append(f"{sum(1 for b in blobs if b) - len(datasets)} non-image file(s) in the input were ignored")
    for ds in datasets:
        _repair_sop_uids(ds)
    return datasets, warnings


def _check_volume(datasets: list[Any], scan_id: str, settings: Settings) -> list[Any]:
    """Slice count, voxel count and spacing from the headers; returns the datasets in slice order."""
    if len(datasets) < 2:
        raise NotVolumetric("a single DICOM image is 2D; a CT volume needs several slices", scan_id=scan_id)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    n_voxels = rows * cols * len(datasets)
    if n_voxels > settings.max_voxels:
        raise TooManyVoxels(
            f"the series has {n_voxels} voxels ({cols}x{rows}x{len(datasets)}), more than the allowed "
            f"{settings.max_voxels}",
            scan_id=scan_id,
        )
    pixel_spacing = [float(v) for v in datasets[0].PixelSpacing]
    ordered, slice_spacing = _sort_slices(datasets, scan_id)
    check_spacing((pixel_spacing[1], pixel_spacing[0], slice_spacing), scan_id, settings)
    return ordered


def _is_image_storage(ds: Any) -> bool:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return bool(sop_class) and "Image Storage" in UID(str(sop_class)).name


def _repair_sop_uids(ds: Any) -> None:
    """Some anonymisers blank SOP Class/Instance UID but keep them in the file meta; restore them from there."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
    if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID


def _check_single_series(datasets: list[Any], scan_id: str) -> None:
    """One series, one frame of reference, one image size, orientation and pixel spacing, or refuse."""
    for keyword, what in (
        ("SeriesInstanceUID", "series"),
        ("FrameOfReferenceUID", "frames of reference"),
    ):
        values = {str(ds.get(keyword, "") or "") for ds in datasets}
        if len(values) > 1:
            raise MixedSeries(f"the input mixes images from {len(values)} {what}; send one series", scan_id=scan_id)
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise MixedSeries(f"the input mixes {len(sizes)} image sizes; send one series", scan_id=scan_id)
    if any(int(ds.get("SamplesPerPixel", 1) or 1) != 1 for ds in datasets):
        raise UnsupportedDtype("colour (multi-sample) images cannot be Hounsfield units", scan_id=scan_id)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if any(ds.get(keyword) is None for ds in datasets):
            raise UnreadableScan(f"DICOM images lack {keyword}: no 3D geometry", scan_id=scan_id)
    first = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    if any(not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), first, atol=1e-3) for ds in datasets):
        raise MixedSeries("the images have different orientations; send one series", scan_id=scan_id)
    spacing = np.asarray(datasets[0].PixelSpacing, dtype=float)
    if any(not np.allclose(np.asarray(ds.PixelSpacing, dtype=float), spacing, rtol=1e-4) for ds in datasets):
        raise MixedSeries("the images have different pixel spacings; send one series", scan_id=scan_id)


def _sort_slices(datasets: list[Any], scan_id: str) -> tuple[list[Any], float]:
    """Sort by position along the slice normal (highdicom) and refuse gaps, duplicates and irregular spacing."""
    from highdicom.spatial import get_series_volume_positions

    def positions(allow_missing_positions: bool = False, allow_duplicate_positions: bool = False) -> tuple[Any, Any]:
        return get_series_volume_positions(
            datasets,
            orientation_tol=1e-3,
            allow_missing_positions=allow_missing_positions,
            allow_duplicate_positions=allow_duplicate_positions,
        )

    spacing, index = positions()
    if spacing is None:
        if positions(allow_duplicate_positions=True)[0] is not None:
            raise DuplicateSlices("two or more images lie at the same slice position", scan_id=scan_id)
        if positions(allow_missing_positions=True)[0] is not None:
            raise MissingSlices("slices are missing: the slice positions have gaps", scan_id=scan_id)
        if positions(allow_missing_positions=True, allow_duplicate_positions=True)[0] is not None:
            raise DuplicateSlices("the series has both duplicated and missing slices", scan_id=scan_id)
        raise MissingSlices(
            "the slice positions are not evenly spaced along the slice normal (irregular spacing or gantry tilt)",
            scan_id=scan_id,
        )
    order = np.argsort(np.asarray(index))
    return [datasets[i] for i in order], float(spacing)


def _hu_dtype(datasets: list[Any]) -> np.dtype[Any]:
    """The smallest dtype that holds every rescaled value exactly (int16 for typical CT), else float32."""
    lo = hi = 0.0
    for ds in datasets:
        if "ModalityLUTSequence" in ds or "PixelData" not in ds:
            return np.dtype(np.float32)
        slope, inter = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if not (slope.is_integer() and inter.is_integer()):
            return np.dtype(np.float32)
        bits = int(ds.BitsStored)
        stored = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.PixelRepresentation) == 1 else (0, 2**bits - 1)
        values = [v * slope + inter for v in stored]
        lo, hi = min(lo, *values), max(hi, *values)
    for dtype in (np.int16, np.int32):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.float32)


def _normal_lps(ds: Any) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _decode_series(ordered: list[Any], scan_id: str) -> tuple[nib.Nifti1Image, list[Any]]:
    """Decode with highdicom, then lay the volume out as dicom2nifti does (column, row, slice; slices ascending
    along the normal; RAS affine) and return the datasets in that slice order."""
    import highdicom as hd

    try:
        # Shallow copies take pydicom's decoded-pixel cache with them when they go.
        vol = hd.get_volume_from_series(
            [copy.copy(ds) for ds in ordered], dtype=_hu_dtype(ordered), orientation_tol=1e-3
        )
    except Exception as exc:  # codecs raise many exception types; all mean "cannot decode"
        raise UnreadableScan(
            f"the DICOM pixel data could not be decoded ({type(exc).__name__}: {str(exc)[:200]})", scan_id=scan_id
        ) from exc
    vol = vol.permute_spatial_axes([2, 1, 0])
    if float(np.dot(vol.affine[:3, 2], _normal_lps(ordered[0]))) < 0:
        vol = vol.flip_spatial([2])
        ordered = ordered[::-1]
    for ds in ordered:  # the volume has the pixels now; the datasets stay as metadata for a DICOM-SEG
        if "PixelData" in ds:
            del ds.PixelData
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    img = nib.Nifti1Image(np.asfortranarray(vol.array), affine)  # no negative strides (torch refuses them)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img, list(ordered)
