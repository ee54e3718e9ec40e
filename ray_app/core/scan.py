"""Reading and validating CT scans: NIfTI (plain or gzip), DICOM series (folder, file list or zip), from a path
or from bytes (``s3://`` objects: :mod:`ray_app.storage.scans`).

Every check that can be made from headers (size, dimensions, dtype, spacing, affine, slice layout) runs before
pixel data are decoded or allocated, so a hostile or broken input costs almost nothing. Each problem raises its
own :class:`~ray_app.core.errors.ScanError` subclass whose message names the scan id and the problem, never a file
name or a patient identifier. The checks live by format: :mod:`~ray_app.core.nifti` (headers),
:mod:`~ray_app.core.dicom` (series), :mod:`~ray_app.core.archive` (zip safety) and
:mod:`~ray_app.core.hounsfield` (voxels and the modality policy); this module sniffs the input and returns a
:class:`Scan`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ray_app.core import archive, dicom, nifti
from ray_app.core.errors import EmptyScan, InputTooLarge, ScanNotFound, UnreadableScan
from ray_app.core.hounsfield import check_voxels
from ray_app.settings import Settings

Source = str | os.PathLike[str] | bytes | nib.Nifti1Image | Sequence[str | os.PathLike[str] | bytes]

_KIND_ALIASES = {
    "nifti": "nifti",
    "nii": "nifti",
    "application/octet-stream": None,
    "nifti-gz": "nifti-gz",
    "nii.gz": "nifti-gz",
    "application/gzip": "nifti-gz",
    "application/x-gzip": "nifti-gz",
    "dicom-zip": "dicom-zip",
    "zip": "dicom-zip",
    "application/zip": "dicom-zip",
    "application/x-zip-compressed": "dicom-zip",
    "dicom": "dicom",
    "dcm": "dicom",
    "application/dicom": "dicom",
}


@dataclass
class Scan:
    """One validated CT volume on its original grid, plus what later stages need to know about its source.

    ``dicom`` holds the source series' headers (pixel data dropped once decoded; sorted so that ``dicom[k]`` is
    ``image[:, :, k]``) only so that a DICOM-SEG can reference it; it is kept out of ``repr`` because it carries
    patient identifiers.
    """

    scan_id: str
    image: nib.Nifti1Image
    source_uri: str | None = None
    modality: str | None = None
    dicom: list[Any] | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)
    intensity_range: tuple[float, float] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in self.image.header.get_zooms()[:3])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.image.affine, dtype=float)


def load_scan(source: Source, scan_id: str, settings: Settings, *, kind: str | None = None) -> Scan:
    """Read and validate a scan from a local path (a file, or a folder of DICOM files), bytes, a list of DICOM
    files (paths or bytes) or an in-memory NIfTI image. Object-store URIs: :func:`ray_app.storage.scans.load_scan`."""
    if isinstance(source, nib.Nifti1Image):
        return scan_from_image(source, scan_id, settings)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return load_bytes(bytes(source), scan_id, kind=kind, settings=settings)
    if isinstance(source, (str, os.PathLike)):
        uri = os.fspath(source)
        if uri.startswith("s3://"):
            raise TypeError("s3:// sources are read by ray_app.storage.scans.load_scan (ray_app.load_scan)")
        return _load_path(Path(uri), scan_id, settings, kind)
    if isinstance(source, Sequence):
        blobs = [_read_blob(s, scan_id, settings) for s in source]  # type: ignore[arg-type]  # a str is handled above
        _check_total_bytes(sum(len(b) for b in blobs), scan_id, settings)
        return load_dicom_series(blobs, scan_id, settings, source_uri=None)
    raise TypeError(f"unsupported scan source type {type(source).__name__}")


def load_bytes(
    data: bytes,
    scan_id: str,
    *,
    settings: Settings,
    kind: str | None = None,
    source_uri: str | None = None,
) -> Scan:
    """Read a scan held in memory, without temp files.

    ``kind`` is a hint: "nifti", "nifti-gz", "dicom-zip", "dicom", a MIME type or a file name. When it is given
    the bytes must match it (a clear error beats a confusing one further on); without it the magic bytes decide.
    """
    if not data:
        raise EmptyScan("the input is empty (0 bytes)", scan_id=scan_id)
    _check_total_bytes(len(data), scan_id, settings)
    declared = _normalise_kind(kind)
    sniffed = _sniff(data)
    if declared is not None and sniffed != declared:
        raise UnreadableScan(
            f"the input was declared as {declared} but its content is {sniffed or 'not a recognised format'}",
            scan_id=scan_id,
        )
    if sniffed in ("nifti", "nifti-gz"):
        img = nifti.nifti_from_bytes(data, sniffed == "nifti-gz", scan_id, settings)
        return scan_from_image(img, scan_id, settings, source_uri=source_uri, _checked_header=True)
    if sniffed == "dicom-zip":
        return load_dicom_series(archive.unzip(data, scan_id, settings), scan_id, settings, source_uri=source_uri)
    if sniffed == "dicom":
        return load_dicom_series([data], scan_id, settings, source_uri=source_uri)
    raise UnreadableScan("the input is not a NIfTI image, a DICOM file or a zip archive", scan_id=scan_id)


def scan_from_image(
    img: nib.Nifti1Image,
    scan_id: str,
    settings: Settings,
    *,
    source_uri: str | None = None,
    modality: str | None = None,
    _checked_header: bool = False,
) -> Scan:
    """Validate an in-memory NIfTI image (header first, then voxels) and wrap it as a :class:`Scan`.

    Voxels are materialised once; a scaled integer file becomes float32 (not nibabel's float64) and the header's
    scaling is cleared, so the image holds HU exactly as TotalSegmentator will read them.
    """
    if not _checked_header:
        nifti.check_header(img.header, scan_id, settings)
    shape = nifti.spatial_shape(img.header.get_data_shape(), scan_id)
    data = np.asanyarray(img.dataobj).reshape(shape)
    if data.dtype == np.float64 and img.get_data_dtype() != np.float64:  # nibabel's scaling made it float64
        data = data.astype(np.float32)
    header = img.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(np.nan, np.nan)
    out = type(img)(data, img.affine, header)
    scan = Scan(scan_id=scan_id, image=out, source_uri=source_uri, modality=modality)
    scan.intensity_range = check_voxels(data, scan_id, settings, scan.warnings)
    return scan


def load_dicom_series(
    blobs: Sequence[bytes], scan_id: str, settings: Settings, *, source_uri: str | None = None
) -> Scan:
    """Read one DICOM CT series from file contents: validate the series from its headers, then decode."""
    series = dicom.read_series(blobs, scan_id, settings)
    scan = Scan(
        scan_id=scan_id,
        image=series.image,
        source_uri=source_uri,
        modality=series.modality,
        dicom=series.datasets,
        warnings=series.warnings,
    )
    scan.intensity_range = check_voxels(np.asanyarray(series.image.dataobj), scan_id, settings, scan.warnings)
    return scan


# ----------------------------------------------------------------------------------------------- sources


def _load_path(path: Path, scan_id: str, settings: Settings, kind: str | None) -> Scan:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise EmptyScan("the folder holds no files", scan_id=scan_id)
        _check_total_bytes(sum(p.stat().st_size for p in files), scan_id, settings)
        blobs = [p.read_bytes() for p in files]
        return load_dicom_series(blobs, scan_id, settings, source_uri=str(path))
    data = _read_blob(path, scan_id, settings)
    return load_bytes(data, scan_id, kind=kind, settings=settings, source_uri=str(path))


def _read_blob(source: str | os.PathLike[str] | bytes, scan_id: str, settings: Settings) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ScanNotFound("the input path does not exist", scan_id=scan_id) from exc
    _check_total_bytes(size, scan_id, settings)
    try:
        return path.read_bytes()
    except IsADirectoryError as exc:
        raise UnreadableScan("a folder was given where a file was expected", scan_id=scan_id) from exc


def _check_total_bytes(n: int, scan_id: str, settings: Settings) -> None:
    if n > settings.max_input_bytes:
        raise InputTooLarge(
            f"the input is {n} bytes, more than the allowed {settings.max_input_bytes}", scan_id=scan_id
        )


def _normalise_kind(kind: str | None) -> str | None:
    if not kind:
        return None
    k = kind.strip().lower().split(";")[0]
    if k in _KIND_ALIASES:
        return _KIND_ALIASES[k]
    for suffix, name in ((".nii.gz", "nifti-gz"), (".nii", "nifti"), (".zip", "dicom-zip"), (".dcm", "dicom")):
        if k.endswith(suffix):
            return name
    return None


def _sniff(data: bytes) -> str | None:
    if data[:2] == b"\x1f\x8b":
        return "nifti-gz"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "dicom-zip"
    if data[128:132] == b"DICM":
        return "dicom"
    if nifti.is_nifti_header_size(data):
        return "nifti"
    return None
