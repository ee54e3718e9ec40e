"""Outputs a user opens elsewhere: the mask NIfTI lines up with the scan, the DICOM-SEG reads back with highdicom
onto the right source slices, the preview is a PNG of a known size."""

from __future__ import annotations

import dataclasses
import gzip
import io
import zipfile

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from totalsegmentator.map_to_binary import class_map

from ray_app.core import errors
from ray_app.core.outputs import (
    PREVIEW_DPI,
    PREVIEW_SIZE_IN,
    dicom_seg_bytes,
    mask_to_nifti_bytes,
    per_structure_masks,
    per_structure_zip,
    preview_png,
)
from ray_app.core.scan import load_scan
from ray_app.settings import Settings
from tests import _scan_factory as f

LABELS = class_map["total"]
INV = {name: label for label, name in LABELS.items()}


@pytest.fixture(scope="module")
def nifti_example():
    return load_scan(f.CT_SM, "ct-sm", Settings()), np.asanyarray(nib.load(f.SEG_FAST).dataobj)


@pytest.fixture(scope="module")
def dicom_example():
    scan = load_scan(f.DICOM_DIR, "dicom-1", Settings())
    mask = np.zeros(scan.shape, np.uint8)
    mask[100:200, 150:300, 2:10] = INV["liver"]
    mask[300:350, 300:400, 5] = INV["kidney_right"]
    mask[250:260, 250:260, 15:17] = INV["aorta"]
    return scan, mask


def test_mask_nifti_is_uint8_on_the_scans_exact_grid(nifti_example):
    scan, mask = nifti_example
    data = mask_to_nifti_bytes(mask, scan)
    assert data[:2] == b"\x1f\x8b"
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), mask)
    np.testing.assert_array_equal(img.affine, scan.affine)
    assert img.header.get_zooms() == scan.image.header.get_zooms()
    assert img.header.get_sform(coded=True)[1] == scan.image.header.get_sform(coded=True)[1]
    assert mask_to_nifti_bytes(mask, scan) == data  # deterministic bytes (no gzip timestamp)


def test_mask_on_another_grid_produces_nothing(nifti_example):
    scan, mask = nifti_example
    with pytest.raises(ValueError, match="shape"):
        mask_to_nifti_bytes(mask[:, :, :-1], scan)
    with pytest.raises(ValueError, match="integer"):
        mask_to_nifti_bytes(mask.astype(np.float32), scan)


def test_per_structure_masks_are_binary_and_only_for_present_structures(nifti_example):
    scan, mask = nifti_example
    files = per_structure_masks(mask, scan, LABELS, names=["liver", "spleen", "aorta", "brain"])
    assert set(files) == {"liver", "spleen", "aorta"}
    liver = nib.Nifti1Image.from_bytes(gzip.decompress(files["liver"]))
    np.testing.assert_array_equal(np.asanyarray(liver.dataobj), (mask == INV["liver"]).astype(np.uint8))
    np.testing.assert_array_equal(liver.affine, scan.affine)


def test_per_structure_zip_holds_one_file_per_present_structure_and_is_reproducible(nifti_example):
    scan, mask = nifti_example
    data = per_structure_zip(mask, scan, LABELS)
    assert data == per_structure_zip(mask, scan, LABELS)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        present = {LABELS[int(v)] for v in np.unique(mask) if v}
        assert sorted(names) == sorted(f"{n}.nii.gz" for n in present)
        spleen = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read("spleen.nii.gz")))
    np.testing.assert_array_equal(np.asanyarray(spleen.dataobj), (mask == INV["spleen"]).astype(np.uint8))
    np.testing.assert_array_equal(spleen.affine, scan.affine)


def test_dicom_seg_reads_back_onto_the_source_slices(dicom_example):
    scan, mask = dicom_example
    scan = dataclasses.replace(scan, dicom=f.with_uids(scan.dicom))
    data = dicom_seg_bytes(scan, mask, LABELS, model={"task": "total", "versions": {"totalsegmentator": "2.18.0"}})
    seg = hd.seg.segread(io.BytesIO(data))

    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels == ["kidney_right", "liver", "aorta"]  # present structures, by label id
    liver = seg.get_segment_description(2)
    assert liver.segmented_property_type.value == "10200004"  # SNOMED CT "Liver", from TotalSegmentator's map
    assert seg.SeriesInstanceUID != scan.dicom[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == scan.dicom[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == scan.dicom[0].SeriesInstanceUID

    uids = [ds.SOPInstanceUID for ds in scan.dicom]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2, 3])
    for number, name in enumerate(labels, start=1):
        expected = (mask == INV[name]).transpose(2, 1, 0)  # (slice, row, column)
        np.testing.assert_array_equal(pixels[..., number - 1].astype(bool), expected, err_msg=name)


def test_dicom_seg_needs_dicom_input_with_uids(dicom_example, nifti_example):
    nifti_scan, nifti_mask = nifti_example
    with pytest.raises(errors.DicomSegUnavailable, match="not read from DICOM"):
        dicom_seg_bytes(nifti_scan, nifti_mask, LABELS)
    blank = load_scan(f.DICOM_DIR, "blank-uids", Settings())  # the example as anonymised: no Study/Series UIDs
    with pytest.raises(errors.DicomSegUnavailable, match="StudyInstanceUID") as excinfo:
        dicom_seg_bytes(blank, dicom_example[1], LABELS)
    assert excinfo.value.code == "dicom_seg_unavailable" and "blank-uids" in str(excinfo.value)


def test_preview_is_a_png_of_fixed_size(nifti_example, dicom_example):
    expected = (int(PREVIEW_SIZE_IN[0] * PREVIEW_DPI), int(PREVIEW_SIZE_IN[1] * PREVIEW_DPI))
    for scan, mask in (nifti_example, dicom_example, (nifti_example[0], np.zeros(nifti_example[0].shape, np.uint8))):
        data = preview_png(scan, mask, LABELS)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(data))
        image.verify()
        assert image.size == expected
