"""Reading scans: good inputs keep their exact geometry; every kind of bad input is refused with its own error
code, cheaply, and without naming the patient."""

from __future__ import annotations

import gzip
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from ray_app.core import errors
from ray_app.core.scan import load_bytes, load_dicom_series, load_scan, scan_from_image
from ray_app.settings import Settings
from tests import _scan_factory as f
from tests.guards import audit


@pytest.fixture(scope="module")
def dicom_scan():
    return load_scan(f.DICOM_DIR, "dicom-1", Settings())


# ------------------------------------------------------------------------------------------------ good inputs


def test_nifti_gz_keeps_original_grid_and_values():
    ref = nib.load(f.CT_SM)
    scan = load_scan(f.CT_SM, "ct-sm", Settings())
    assert scan.shape == ref.shape
    np.testing.assert_array_equal(scan.affine, ref.affine)
    np.testing.assert_array_equal(np.asanyarray(scan.image.dataobj), np.asanyarray(ref.dataobj))
    assert scan.image.get_data_dtype() == np.int16
    assert scan.modality is None and scan.dicom is None and scan.warnings == []
    assert scan.intensity_range == (-1100.0, 1207.0)


def test_nifti_from_bytes_writes_no_temp_files():
    gz = f.CT_SM.read_bytes()
    with audit() as events:
        from_gz = load_bytes(gz, "b1", kind="application/gzip", settings=Settings())
        plain = load_bytes(gzip.decompress(gz), "b2", kind="nifti", settings=Settings())
    assert events.writes() == []
    np.testing.assert_array_equal(np.asanyarray(from_gz.image.dataobj), np.asanyarray(plain.image.dataobj))
    np.testing.assert_array_equal(from_gz.affine, plain.affine)


def test_scaled_integer_nifti_becomes_float32_hu():
    data = f.ct_like()
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, -10.0)  # stored ints, real values = 0.5 * stored - 10
    scan = load_bytes(gzip.compress(img.to_bytes()), "scaled", settings=Settings())
    values = np.asanyarray(scan.image.dataobj)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, data * 0.5 - 10.0)


def test_trailing_singleton_dimension_is_accepted():
    scan = load_bytes(f.nifti_bytes(f.ct_like()[..., None]), "x-y-z-1", settings=Settings())
    assert scan.shape == (24, 20, 16)


def test_dicom_series_matches_dicom2nifti_geometry(dicom_scan, tmp_path):
    import dicom2nifti

    out = tmp_path / "ref.nii.gz"
    dicom2nifti.dicom_series_to_nifti(str(f.DICOM_DIR), str(out), reorient_nifti=False)
    ref = nib.load(out)
    assert dicom_scan.shape == ref.shape == (512, 512, 20)
    np.testing.assert_allclose(dicom_scan.affine, ref.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asanyarray(dicom_scan.image.dataobj), ref.get_fdata())
    assert dicom_scan.modality == "CT" and dicom_scan.warnings == []
    assert dicom_scan.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))


def test_dicom_datasets_follow_the_slice_axis(dicom_scan):
    """scan.dicom[k] is slice k: its LPS position is the RAS affine's voxel (0, 0, k) with x, y negated."""
    assert len(dicom_scan.dicom) == dicom_scan.shape[2]
    for k, ds in enumerate(dicom_scan.dicom):
        ras = nib.affines.apply_affine(dicom_scan.affine, [0, 0, k])
        np.testing.assert_allclose(np.asarray(ds.ImagePositionPatient, float), ras * [-1, -1, 1], atol=1e-3)


def test_dicom_zip_and_file_list_read_like_the_folder(dicom_scan, tmp_path):
    blobs = f.example_dicom_bytes()
    zipped = f.zip_bytes({f"series/IM{i:04d}": b for i, b in enumerate(blobs[::-1])} | {"README.txt": b"hi"})
    from_zip = load_bytes(zipped, "zip-1", kind="dicom-zip", settings=Settings())
    from_list = load_scan(sorted(f.DICOM_DIR.iterdir())[::-1], "list-1", Settings())
    for scan in (from_zip, from_list):
        np.testing.assert_array_equal(scan.affine, dicom_scan.affine)
        np.testing.assert_array_equal(np.asanyarray(scan.image.dataobj), np.asanyarray(dicom_scan.image.dataobj))
    assert any("ignored" in w for w in from_zip.warnings)


def test_s3_uris_are_read_through_storage(s3_bucket):
    """An object is one file and a prefix ending in ``/`` a DICOM series, read from (moto's) S3."""
    from ray_app import storage
    from ray_app.storage.scans import load_scan as load_any

    storage.write_bytes(f"s3://{s3_bucket}/ct.nii.gz", f.CT_SM.read_bytes())
    for i, blob in enumerate(f.example_dicom_bytes()):
        storage.write_bytes(f"s3://{s3_bucket}/dcm/{i}", blob)
    nifti = load_any(f"s3://{s3_bucket}/ct.nii.gz", "s3-nii", Settings())
    series = load_any(f"s3://{s3_bucket}/dcm/", "s3-dcm", Settings())
    assert nifti.source_uri == f"s3://{s3_bucket}/ct.nii.gz" and nifti.shape == (122, 101, 30)
    assert series.source_uri == f"s3://{s3_bucket}/dcm/" and series.shape == (512, 512, 20)
    with pytest.raises(TypeError, match="storage"):
        load_scan(f"s3://{s3_bucket}/ct.nii.gz", "core-has-no-cloud", Settings())


# ------------------------------------------------------------------------------------------------ bad NIfTI


def _bad(data: np.ndarray, **kw) -> bytes:
    return f.nifti_bytes(data, **kw)


BAD_NIFTI = {
    "empty file": (lambda: b"", errors.EmptyScan),
    "not an image": (lambda: b"hello, this is not a scan" * 40, errors.UnreadableScan),
    "truncated gzip": (lambda: f.CT_SM.read_bytes()[:200_000], errors.TruncatedScan),
    "truncated plain nifti": (lambda: gzip.decompress(f.CT_SM.read_bytes())[:100_000], errors.TruncatedScan),
    "corrupt gzip": (lambda: f.CT_SM.read_bytes()[:100] + b"\0" * 5000, errors.UnreadableScan),
    "2D image": (lambda: _bad(np.zeros((32, 32), np.int16)), errors.NotVolumetric),
    "single slice": (lambda: _bad(np.zeros((32, 32, 1), np.int16)), errors.NotVolumetric),
    "4D image": (lambda: _bad(np.zeros((8, 8, 8, 2), np.int16)), errors.NotVolumetric),
    "complex voxels": (lambda: _bad(np.zeros((8, 8, 8), np.complex64)), errors.UnsupportedDtype),
    "binary (bool) voxels": (
        lambda: _with_datatype(_bad(np.zeros((8, 8, 8), np.uint8), gz=False), code=1, bitpix=1),
        errors.UnsupportedDtype,
    ),
    "RGB voxels": (
        lambda: _bad(np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])),
        errors.UnsupportedDtype,
    ),
    "NaN voxels": (
        lambda: _bad(np.where(f.ct_like() > 0, np.nan, f.ct_like()).astype(np.float32)),
        errors.NonFiniteVoxels,
    ),
    "zero spacing": (lambda: _bad(f.ct_like(), zooms=(1.0, 0.0, 1.0)), errors.InvalidSpacing),
    "negative spacing in affine": (lambda: _bad(f.ct_like(), zooms=(1.0, 1.0, -1.0)), errors.InvalidSpacing),
    "absurd spacing": (lambda: _bad(f.ct_like(), affine=np.diag([1.0, 1.0, 100.0, 1.0])), errors.InvalidSpacing),
    "singular affine": (
        lambda: _bad(f.ct_like(), affine=np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])),
        errors.InvalidAffine,
    ),
    "MR-like intensities": (
        lambda: _bad(np.random.default_rng(0).uniform(0, 800, (16, 16, 16)).astype(np.float32)),
        errors.NotHounsfield,
    ),
    "intensities far above HU": (lambda: _bad(f.ct_like().astype(np.float32) * 1000), errors.NotHounsfield),
}


def _with_datatype(raw: bytes, *, code: int, bitpix: int) -> bytes:
    hdr = bytearray(raw)
    hdr[70:72] = np.int16(code).tobytes()
    hdr[72:74] = np.int16(bitpix).tobytes()
    return bytes(hdr)


@pytest.mark.parametrize("case", list(BAD_NIFTI))
def test_bad_nifti_is_refused_with_its_code(case):
    make, error = BAD_NIFTI[case]
    data = make()
    with audit() as events, pytest.raises(error) as excinfo:
        load_bytes(data, "scan-42", settings=Settings())
    assert events.writes() == []
    assert excinfo.value.code == error.code
    assert excinfo.value.scan_id == "scan-42" and "scan-42" in str(excinfo.value)


def test_header_claiming_a_trillion_voxels_is_refused_before_allocating():
    claim = f.crafted_header_bytes((10_000, 10_000, 10_000), payload=b"\0" * 1000)
    tracemalloc.start()
    try:
        with pytest.raises(errors.TooManyVoxels, match="1000000000000 voxels"):
            load_bytes(claim, "huge", settings=Settings())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024**2


def test_gzip_bomb_is_refused_without_inflating_it():
    bomb = f.crafted_header_bytes((8, 8, 8), payload=b"\0" * (64 * 1024**2))
    assert len(bomb) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(errors.DecompressionBomb):
            load_bytes(bomb, "bomb", settings=Settings())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024**2


def test_voxel_cap_and_byte_cap_come_from_settings():
    data = f.nifti_bytes(f.ct_like())
    with pytest.raises(errors.TooManyVoxels):
        load_bytes(data, "cap", settings=Settings(max_voxels=1000))
    with pytest.raises(errors.InputTooLarge):
        load_bytes(data, "cap", settings=Settings(max_input_bytes=100))


def test_declared_kind_must_match_the_content():
    with pytest.raises(errors.UnreadableScan, match="declared as dicom-zip"):
        load_bytes(f.CT_SM.read_bytes(), "kind", kind="application/zip", settings=Settings())


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(errors.ScanNotFound):
        load_scan(tmp_path / "nope.nii.gz", "missing", Settings())


def test_flag_policy_lets_non_hu_data_through_with_a_warning():
    data = np.random.default_rng(0).uniform(0, 800, (16, 16, 16)).astype(np.float32)
    scan = load_bytes(f.nifti_bytes(data), "mr-ish", settings=Settings(modality_policy="flag"))
    assert len(scan.warnings) == 1 and scan.warnings[0].startswith("not_hounsfield")


def test_in_memory_image_is_validated_too():
    img = nib.Nifti1Image(np.full((8, 8, 8), np.inf, np.float32), np.eye(4))
    with pytest.raises(errors.NonFiniteVoxels):
        scan_from_image(img, "mem", Settings())


# ------------------------------------------------------------------------------------------------ bad DICOM


def _series(mutate=None) -> list[bytes]:
    datasets = f.dicom_datasets()
    if mutate:
        datasets = mutate(datasets) or datasets
    return f.dicom_bytes(datasets)


def _drop(ds, keyword) -> bool:
    delattr(ds, keyword)
    return True


def _shift_slice(datasets, index, mm):
    position = [float(v) for v in datasets[index].ImagePositionPatient]
    datasets[index].ImagePositionPatient = [position[0], position[1], position[2] + mm]


def _set(keyword, value, which=slice(None)):
    def mutate(datasets):
        for ds in datasets[which]:
            setattr(ds, keyword, value)

    return mutate


BAD_DICOM = {
    "MR modality": (_set("Modality", "MR"), errors.NotCT),
    "PET modality": (_set("Modality", "PT"), errors.NotCT),
    "missing slice": (lambda d: d[:10] + d[11:], errors.MissingSlices),
    "duplicated slice": (lambda d: d + [d[7]], errors.DuplicateSlices),
    "several gaps": (lambda d: [ds for i, ds in enumerate(d) if i not in (3, 9, 10, 15)], errors.MissingSlices),
    "irregular spacing": (lambda d: _shift_slice(d, 5, 0.7), errors.MissingSlices),
    "mixed series": (_set("SeriesInstanceUID", "1.2.3.4.5", slice(0, 8)), errors.MixedSeries),
    "mixed frames of reference": (_set("FrameOfReferenceUID", "1.2.3.4.6", slice(0, 8)), errors.MixedSeries),
    "mixed orientation": (_set("ImageOrientationPatient", [1, 0, 0, 0, 0, -1], slice(0, 1)), errors.MixedSeries),
    "single image": (lambda d: d[:1], errors.NotVolumetric),
    "zero pixel spacing": (_set("PixelSpacing", [0, 0]), errors.InvalidSpacing),
    "no geometry": (lambda d: [ds for ds in d if _drop(ds, "ImagePositionPatient")], errors.UnreadableScan),
}


@pytest.mark.parametrize("case", list(BAD_DICOM))
def test_bad_dicom_series_is_refused_before_decoding(case, monkeypatch):
    import highdicom

    mutate, error = BAD_DICOM[case]
    blobs = _series(mutate)

    def no_decoding(*a, **k):
        raise AssertionError("pixel data were decoded for a series that should have been refused")

    monkeypatch.setattr(highdicom, "get_volume_from_series", no_decoding)
    with pytest.raises(error) as excinfo:
        load_dicom_series(blobs, "dcm-7", Settings())
    assert excinfo.value.code == error.code and excinfo.value.scan_id == "dcm-7"


def test_errors_and_scan_repr_never_name_the_patient():
    def identify(datasets):
        for ds in datasets:
            ds.PatientName, ds.PatientID, ds.Modality = "DOE^JOHN", "PID-998877", "MR"

    blobs = _series(identify)
    with pytest.raises(errors.NotCT) as excinfo:
        load_dicom_series(blobs, "anon-1", Settings())
    scan = load_dicom_series(blobs, "anon-1", Settings(modality_policy="flag"))
    shown = " ".join([str(excinfo.value), repr(excinfo.value), repr(scan), *scan.warnings])
    assert "anon-1" in str(excinfo.value)
    assert "DOE" not in shown and "PID-998877" not in shown
    assert scan.modality == "MR" and scan.warnings[0].startswith("not_ct")


@pytest.mark.filterwarnings("ignore:End of file reached")
@pytest.mark.parametrize("keep_bytes", [500, 3000, -20000])
def test_truncated_dicom_file_is_unreadable_not_a_missing_slice(keep_bytes):
    blobs = f.example_dicom_bytes()
    blobs[3] = blobs[3][:keep_bytes]
    with pytest.raises(errors.UnreadableScan, match="truncated"):
        load_dicom_series(blobs, "cut-1", Settings())


def test_zip_without_dicom_images_is_unreadable():
    with pytest.raises(errors.UnreadableScan, match="no DICOM images"):
        load_bytes(f.zip_bytes({"notes.txt": b"not dicom"}), "zip-2", settings=Settings())


# ------------------------------------------------------------------------------------------------ hostile zips


def test_zip_with_parent_path_is_refused():
    blobs = f.example_dicom_bytes()
    for name in ("../../etc/evil.dcm", "/abs/evil.dcm", "ok/../../evil.dcm", "C:\\evil.dcm"):
        with pytest.raises(errors.UnsafeArchivePath):
            load_bytes(f.zip_bytes({"a/1.dcm": blobs[0], name: blobs[1]}), "zip-3", settings=Settings())


def test_zip_bomb_is_refused_from_declared_sizes(monkeypatch):
    import zipfile

    def no_extraction(self, *a, **k):
        raise AssertionError("a member was extracted")

    ratio_bomb = f.zip_bytes({"a.dcm": b"\0" * (32 * 1024**2)})
    size_bomb = f.zip_bytes({"a.dcm": b"\0" * 1_000_000})
    monkeypatch.setattr(zipfile.ZipFile, "open", no_extraction)
    with pytest.raises(errors.DecompressionBomb, match="fold"):
        load_bytes(ratio_bomb, "zip-4", settings=Settings())
    with pytest.raises(errors.DecompressionBomb, match="declares"):
        load_bytes(size_bomb, "zip-5", settings=Settings(max_input_bytes=100_000))


def test_truncated_zip_is_unreadable():
    data = f.zip_bytes({f"{i}.dcm": b for i, b in enumerate(f.example_dicom_bytes())})
    with pytest.raises(errors.UnreadableScan):
        load_bytes(data[: len(data) // 2], "zip-6", settings=Settings())
