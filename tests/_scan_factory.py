"""Builders for good and bad scans, made in memory from the real examples or from scratch."""

from __future__ import annotations

import copy
import gzip
import io
import zipfile
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

EXAMPLES = Path(__file__).resolve().parent / "data" / "totalseg-example"
CT_SM = EXAMPLES / "example_ct_sm.nii.gz"
SEG_FAST = EXAMPLES / "example_seg_fast.nii.gz"
STATS_FAST = EXAMPLES / "example_seg_fast_statistics.json"
DICOM_DIR = EXAMPLES / "example_ct_dicom"


def ct_like(shape=(24, 20, 16), seed=0) -> np.ndarray:
    """int16 HU-like volume: air around a soft-tissue block with some bone."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000, np.int16)
    s = tuple(slice(n // 5, n - n // 5) for n in shape)
    data[s] = rng.integers(-100, 100, size=data[s].shape, dtype=np.int16)
    data[shape[0] // 2, shape[1] // 2, :] = 900
    return data


def nifti_bytes(data: np.ndarray, affine=None, *, gz: bool = True, zooms=None, header=None) -> bytes:
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine, header)
    if zooms is not None:  # written raw: nibabel's set_zooms refuses the invalid values tests need
        img.header["pixdim"][1:4] = zooms
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def crafted_header_bytes(shape, dtype=np.int16, *, payload: bytes = b"", gz: bool = True) -> bytes:
    """A NIfTI-1 header claiming ``shape`` followed by ``payload`` (not the data it claims)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    hdr["magic"] = b"n+1"
    raw = hdr.binaryblock + b"\0\0\0\0" + payload
    return gzip.compress(raw) if gz else raw


@lru_cache(maxsize=1)
def _dicom_blobs() -> tuple[bytes, ...]:
    return tuple(p.read_bytes() for p in sorted(DICOM_DIR.iterdir()))


def dicom_datasets() -> list[pydicom.Dataset]:
    """The example series as fresh in-memory datasets (still JPEG 2000 compressed)."""
    return [pydicom.dcmread(io.BytesIO(b)) for b in _dicom_blobs()]


def dicom_bytes(datasets) -> list[bytes]:
    out = []
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def example_dicom_bytes() -> list[bytes]:
    return list(_dicom_blobs())


def with_uids(datasets, study_uid="1.2.826.0.1.3680043.8.498.1", series_uid="1.2.826.0.1.3680043.8.498.2"):
    """The example's anonymiser blanked Study/Series UIDs; a DICOM-SEG needs them."""
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        out.append(ds)
    return out


def zip_bytes(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def small_phantom(seed: int) -> bytes:
    """A 64x64x48 phantom CT at 3 mm as .nii.gz: a second or two of segmentation with the phantom weights."""
    from ray_app.demo.phantom import make_phantom

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-96.0, -96.0, -72.0)
    ct = make_phantom(seed, affine=affine, shape=(64, 64, 48))[0]
    return gzip.compress(nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), ct.affine).to_bytes(), 1)
