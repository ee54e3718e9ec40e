"""Reading and validating CT scans: NIfTI (plain or gzip), DICOM series (folder, file list or zip), from a path
or from bytes (``s3://`` objects: :mod:`ray_app.storage.scans`).

Every check that can be made from headers (size, dimensions, dtype, spacing, affine, slice layout) runs before
pixel data are decoded or allocated, so a hostile or broken input costs almost nothing. Each problem raises its
own :class:`~ray_app.core.errors.ScanError` subclass whose message names the scan id and the problem, never a file
name or a patient identifier.

DICOM geometry comes from highdicom (slice sorting, spacing regularity, affine) and pixels from pydicom
(JPEG 2000 via pylibjpeg); the result is laid out like dicom2nifti's output: array axes (column, row, slice),
slices ascending along the slice normal, RAS affine.
"""

from __future__ import annotations

import copy
import gzip
import io
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
import numpy as np

from ray_app.core.errors import (
    DecompressionBomb,
    DuplicateSlices,
    EmptyScan,
    InputTooLarge,
    InvalidAffine,
    InvalidSpacing,
    MissingSlices,
    MixedSeries,
    NonFiniteVoxels,
    NotCT,
    NotHounsfield,
    NotVolumetric,
    ScanError,
    ScanNotFound,
    TooManyVoxels,
    TruncatedScan,
    UnreadableScan,
    UnsafeArchivePath,
    UnsupportedDtype,
)
from ray_app.settings import Settings

Source = str | os.PathLike | bytes | nib.Nifti1Image | Sequence[str | os.PathLike | bytes]

#: A zip whose declared content is this many times its compressed size (and above ZIP_RATIO_MIN_BYTES) is a bomb.
ZIP_MAX_RATIO = 100
ZIP_RATIO_MIN_BYTES = 16 * 1024**2
#: More members than any DICOM series has slices; bounds the work of listing a hostile archive.
ZIP_MAX_MEMBERS = 50_000
#: Enough samples for stable percentiles in the Hounsfield plausibility check.
_HU_SAMPLE = 2_000_000

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
        blobs = [_read_blob(s, scan_id, settings) for s in source]
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
        img = _nifti_from_bytes(data, sniffed == "nifti-gz", scan_id, settings)
        return scan_from_image(img, scan_id, settings, source_uri=source_uri, _checked_header=True)
    if sniffed == "dicom-zip":
        return load_dicom_series(_unzip(data, scan_id, settings), scan_id, settings, source_uri=source_uri)
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
        _check_header(img.header, scan_id, settings)
    shape = _spatial_shape(img.header.get_data_shape(), scan_id)
    data = np.asanyarray(img.dataobj).reshape(shape)
    if data.dtype == np.float64 and img.get_data_dtype() != np.float64:  # nibabel's scaling made it float64
        data = data.astype(np.float32)
    header = img.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(np.nan, np.nan)
    out = type(img)(data, img.affine, header)
    scan = Scan(scan_id=scan_id, image=out, source_uri=source_uri, modality=modality)
    _check_voxels(scan, settings)
    return scan


def load_dicom_series(
    blobs: Sequence[bytes], scan_id: str, settings: Settings, *, source_uri: str | None = None
) -> Scan:
    """Read one DICOM CT series from file contents: validate the series from its headers, then decode."""
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

    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise UnreadableScan(
            "multi-frame (enhanced) DICOM is not supported; send the series as single-frame images", scan_id=scan_id
        )
    _check_single_series(datasets, scan_id)
    modality = str(datasets[0].get("Modality", "") or "") or None
    if modality != "CT":
        _modality_problem(
            NotCT(f"the DICOM modality is {modality or 'missing'}, not CT", scan_id=scan_id), settings, warnings
        )
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
    _check_spacing((pixel_spacing[1], pixel_spacing[0], slice_spacing), scan_id, settings)

    img, ordered = _decode_series(ordered, scan_id)
    _check_header(img.header, scan_id, settings)
    scan = Scan(
        scan_id=scan_id, image=img, source_uri=source_uri, modality=modality, dicom=list(ordered), warnings=warnings
    )
    _check_voxels(scan, settings)
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


def _read_blob(source: str | os.PathLike | bytes, scan_id: str, settings: Settings) -> bytes:
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
    if len(data) >= 4 and {struct.unpack("<i", data[:4])[0], struct.unpack(">i", data[:4])[0]} & {348, 540}:
        return "nifti"
    return None


# ----------------------------------------------------------------------------------------------- NIfTI


def _nifti_from_bytes(data: bytes, gzipped: bool, scan_id: str, settings: Settings) -> nib.Nifti1Image:
    """Parse and check the header, then read exactly the bytes it declares (never more: a gzip bomb stops here)."""
    if not gzipped:
        hdr, klass, need = _parse_nifti_header(data[:540], scan_id, settings)
        if len(data) < need:
            raise TruncatedScan(f"the file has {len(data)} bytes but its header declares {need}", scan_id=scan_id)
        return klass.from_bytes(data[:need])
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
            head = gz.read(540)
            hdr, klass, need = _parse_nifti_header(head, scan_id, settings)
            raw = head + gz.read(max(need - len(head), 0) + 1)
    except EOFError as exc:
        raise TruncatedScan("the gzip stream ends early (truncated file)", scan_id=scan_id) from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise UnreadableScan(f"corrupt gzip data ({exc})", scan_id=scan_id) from exc
    if len(raw) < need:
        raise TruncatedScan(
            f"the file decompresses to {len(raw)} bytes but its header declares {need}", scan_id=scan_id
        )
    if len(raw) > need:
        raise DecompressionBomb(
            "the gzip stream decompresses to more data than the image its header declares", scan_id=scan_id
        )
    return klass.from_bytes(raw)


def _parse_nifti_header(head: bytes, scan_id: str, settings: Settings):
    """Return (header, image class, total bytes needed) after every check a header alone allows."""
    if len(head) < 348:
        raise TruncatedScan("the file ends inside the NIfTI header", scan_id=scan_id)
    sizes = (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0])
    if 348 in sizes:
        hdr_class, img_class, size = nib.Nifti1Header, nib.Nifti1Image, 348
    elif 540 in sizes:
        hdr_class, img_class, size = nib.Nifti2Header, nib.Nifti2Image, 540
    else:
        raise UnreadableScan("not a NIfTI file (bad header size field)", scan_id=scan_id)
    if len(head) < size:
        raise TruncatedScan("the file ends inside the NIfTI header", scan_id=scan_id)
    try:
        hdr = hdr_class.from_fileobj(io.BytesIO(head[:size]), check=False)
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError or struct errors for garbage
        raise UnreadableScan(f"invalid NIfTI header ({exc})", scan_id=scan_id) from exc
    if hdr["magic"].item() not in (b"n+1", b"n+2"):
        raise UnreadableScan(
            "not a single-file NIfTI image (a separate .hdr/.img pair is not supported)", scan_id=scan_id
        )
    try:
        _check_header(hdr, scan_id, settings)
        hdr = hdr_class.from_fileobj(io.BytesIO(head[:size]), check=True)
    except ScanError:
        raise
    except Exception as exc:  # the specific checks passed; nibabel's own consistency checks did not
        raise UnreadableScan(f"invalid NIfTI header ({exc})", scan_id=scan_id) from exc
    n_voxels = math.prod(int(d) for d in hdr.get_data_shape())
    need = int(hdr.get_data_offset()) + n_voxels * hdr.get_data_dtype().itemsize
    return hdr, img_class, need


def _spatial_shape(shape: Sequence[int], scan_id: str) -> tuple[int, int, int]:
    """The 3D shape, accepting trailing singleton dimensions (x, y, z, 1) that some converters write."""
    dims = [int(d) for d in shape]
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) > 3:
        raise NotVolumetric(
            f"the image is {len(dims)}D (shape {tuple(dims)}); one 3D volume is needed", scan_id=scan_id
        )
    if len(dims) < 3 or min(dims) < 2:
        raise NotVolumetric(f"the image is 2D (shape {tuple(dims)}); a 3D volume is needed", scan_id=scan_id)
    return tuple(dims)  # type: ignore[return-value]


def _check_header(hdr, scan_id: str, settings: Settings) -> None:
    """Everything that can be refused before a single voxel is read or allocated."""
    _spatial_shape(hdr.get_data_shape(), scan_id)
    n_voxels = math.prod(int(d) for d in hdr.get_data_shape())
    if n_voxels > settings.max_voxels:
        raise TooManyVoxels(
            f"the image has {n_voxels} voxels (shape {tuple(hdr.get_data_shape())}), more than the allowed "
            f"{settings.max_voxels}",
            scan_id=scan_id,
        )
    dtype = hdr.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        kind = {"c": "complex", "b": "boolean"}.get(dtype.kind, "binary or structured (e.g. RGB)")
        raise UnsupportedDtype(f"{kind} voxels ({dtype}) cannot be Hounsfield units", scan_id=scan_id)
    _check_spacing(hdr.get_zooms()[:3], scan_id, settings)
    affine = hdr.get_best_affine()
    if not np.all(np.isfinite(affine)):
        raise InvalidAffine("the voxel-to-world affine contains NaN or infinity", scan_id=scan_id)
    linear = affine[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if np.any(norms == 0) or abs(np.linalg.det(linear)) < 1e-6 * float(np.prod(norms)):
        raise InvalidAffine("the voxel-to-world affine is not invertible", scan_id=scan_id)
    if np.any(norms < settings.min_spacing_mm) or np.any(norms > settings.max_spacing_mm):
        raise InvalidAffine(
            f"the affine's voxel sizes {np.round(norms, 4).tolist()} mm are outside "
            f"[{settings.min_spacing_mm}, {settings.max_spacing_mm}]",
            scan_id=scan_id,
        )


def _check_spacing(spacing: Sequence[float], scan_id: str, settings: Settings) -> None:
    values = [float(s) for s in spacing]
    if not all(math.isfinite(s) and settings.min_spacing_mm <= s <= settings.max_spacing_mm for s in values):
        raise InvalidSpacing(
            f"voxel spacing {[round(s, 4) for s in values]} mm is zero, negative or outside "
            f"[{settings.min_spacing_mm}, {settings.max_spacing_mm}] mm",
            scan_id=scan_id,
        )


# ----------------------------------------------------------------------------------------------- voxels


def _check_voxels(scan: Scan, settings: Settings) -> None:
    """Non-finite voxels, then whether the intensities can be Hounsfield units at all."""
    data = np.asanyarray(scan.image.dataobj)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise NonFiniteVoxels(f"{n_bad} voxel(s) are NaN or infinite", scan_id=scan.scan_id)
    lo, hi = float(data.min()), float(data.max())
    scan.intensity_range = (lo, hi)
    problem = _hu_problem(data, lo, hi)
    if problem:
        _modality_problem(NotHounsfield(problem, scan_id=scan.scan_id), settings, scan.warnings)


def _hu_problem(data: np.ndarray, lo: float, hi: float) -> str | None:
    """Why these intensities cannot be CT Hounsfield units, or None.

    A CT in HU virtually always contains air (about -1000) or fat (about -100): an image with nothing below -200
    is MR, PET, or CT that was not rescaled to HU or was normalised. Its bulk (99.5th percentile) stays below
    dense bone; scanner padding (e.g. -3024) is legitimate and not judged.
    """
    if lo > -200:
        return (
            f"no voxel is below -200 (range {lo:g} to {hi:g}): the image has no air or fat, so its intensities "
            "are not CT Hounsfield units (MR, PET, or unscaled/normalised data?)"
        )
    step = max(1, math.ceil((data.size / _HU_SAMPLE) ** (1 / 3)))
    p_hi = float(np.percentile(data[::step, ::step, ::step], 99.5))  # a strided view: no full-size copy
    if p_hi > 4000 or hi > 50000 or lo < -50000:
        return f"intensities range {lo:g} to {hi:g} (99.5th percentile {p_hi:g}): far outside the Hounsfield scale"
    return None


def _modality_problem(error: ScanError, settings: Settings, warnings: list[str]) -> None:
    if settings.modality_policy == "refuse":
        raise error
    warnings.append(f"{error.code}: {error.message}")


# ----------------------------------------------------------------------------------------------- zip


def _unzip(data: bytes, scan_id: str, settings: Settings) -> list[bytes]:
    """Members of a zip, in memory; paths and declared sizes are checked before anything is decompressed."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise UnreadableScan(f"not a readable zip archive ({exc})", scan_id=scan_id) from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > ZIP_MAX_MEMBERS:
            raise DecompressionBomb(f"the archive has {len(infos)} members", scan_id=scan_id)
        for info in infos:
            if _unsafe_member(info.filename):
                raise UnsafeArchivePath("the archive has a member with an absolute or '..' path", scan_id=scan_id)
        files = [i for i in infos if not i.is_dir()]
        declared = sum(i.file_size for i in files)
        compressed = sum(i.compress_size for i in files)
        if declared > settings.max_input_bytes:
            raise DecompressionBomb(
                f"the archive declares {declared} bytes of content, more than the allowed {settings.max_input_bytes}",
                scan_id=scan_id,
            )
        if declared > ZIP_RATIO_MIN_BYTES and declared > ZIP_MAX_RATIO * max(compressed, 1):
            raise DecompressionBomb(
                f"the archive expands {declared / max(compressed, 1):.0f}-fold (limit {ZIP_MAX_RATIO})",
                scan_id=scan_id,
            )
        blobs = []
        for info in files:
            name = PurePosixPath(info.filename).name
            if name.startswith(".") or info.filename.startswith("__MACOSX/"):
                continue
            try:
                with zf.open(info) as member:
                    blob = member.read(info.file_size + 1)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as exc:
                raise UnreadableScan(f"a zip member cannot be extracted ({exc})", scan_id=scan_id) from exc
            if len(blob) != info.file_size:
                raise DecompressionBomb("a zip member's size differs from what the archive declares", scan_id=scan_id)
            blobs.append(blob)
    if not blobs:
        raise EmptyScan("the archive holds no files", scan_id=scan_id)
    return blobs


def _unsafe_member(name: str) -> bool:
    norm = name.replace("\\", "/")
    return norm.startswith("/") or bool(re.match(r"^[A-Za-z]:", norm)) or ".." in PurePosixPath(norm).parts


# ----------------------------------------------------------------------------------------------- DICOM


def _is_image_storage(ds) -> bool:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return bool(sop_class) and "Image Storage" in UID(str(sop_class)).name


def _repair_sop_uids(ds) -> None:
    """Some anonymisers blank SOP Class/Instance UID but keep them in the file meta; restore them from there."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
    if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID


def _check_single_series(datasets: list, scan_id: str) -> None:
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


def _sort_slices(datasets: list, scan_id: str) -> tuple[list, float]:
    """Sort by position along the slice normal (highdicom) and refuse gaps, duplicates and irregular spacing."""
    from highdicom.spatial import get_series_volume_positions

    def positions(**kw):
        return get_series_volume_positions(datasets, orientation_tol=1e-3, **kw)

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


def _hu_dtype(datasets: list) -> np.dtype:
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


def _normal_lps(ds) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _decode_series(ordered: list, scan_id: str) -> tuple[nib.Nifti1Image, list]:
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
