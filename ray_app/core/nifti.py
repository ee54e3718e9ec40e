"""NIfTI headers, checked before a voxel is read: shape, size, dtype, spacing and affine; then exactly the bytes
the header declares are read (never more, so a gzip bomb stops at the header's size)."""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np

from ray_app.core.errors import (
    DecompressionBomb,
    InvalidAffine,
    InvalidSpacing,
    NotVolumetric,
    ScanError,
    TooManyVoxels,
    TruncatedScan,
    UnreadableScan,
    UnsupportedDtype,
)
from ray_app.settings import Settings


def is_nifti_header_size(data: bytes) -> bool:
    """Whether the first four bytes are a NIfTI-1 (348) or NIfTI-2 (540) header size, in either byte order."""
    return len(data) >= 4 and bool({struct.unpack("<i", data[:4])[0], struct.unpack(">i", data[:4])[0]} & {348, 540})


def nifti_from_bytes(data: bytes, gzipped: bool, scan_id: str, settings: Settings) -> nib.Nifti1Image:
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


def _parse_nifti_header(head: bytes, scan_id: str, settings: Settings) -> tuple[Any, type[nib.Nifti1Image], int]:
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
        check_header(hdr, scan_id, settings)
        hdr = hdr_class.from_fileobj(io.BytesIO(head[:size]), check=True)
    except ScanError:
        raise
    except Exception as exc:  # the specific checks passed; nibabel's own consistency checks did not
        raise UnreadableScan(f"invalid NIfTI header ({exc})", scan_id=scan_id) from exc
    n_voxels = math.prod(int(d) for d in hdr.get_data_shape())
    need = int(hdr.get_data_offset()) + n_voxels * hdr.get_data_dtype().itemsize
    return hdr, img_class, need


def spatial_shape(shape: Sequence[int], scan_id: str) -> tuple[int, int, int]:
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


def check_header(hdr: Any, scan_id: str, settings: Settings) -> None:
    """Everything that can be refused before a single voxel is read or allocated."""
    spatial_shape(hdr.get_data_shape(), scan_id)
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
    check_spacing(hdr.get_zooms()[:3], scan_id, settings)
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


def check_spacing(spacing: Sequence[float], scan_id: str, settings: Settings) -> None:
    values = [float(s) for s in spacing]
    if not all(math.isfinite(s) and settings.min_spacing_mm <= s <= settings.max_spacing_mm for s in values):
        raise InvalidSpacing(
            f"voxel spacing {[round(s, 4) for s in values]} mm is zero, negative or outside "
            f"[{settings.min_spacing_mm}, {settings.max_spacing_mm}] mm",
            scan_id=scan_id,
        )
