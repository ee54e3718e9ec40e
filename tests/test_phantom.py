"""The phantom is ground truth for every segmentation test, so its labels, HU and geometry must be right."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ray_app.demo.phantom import make_phantom, phantom_labels

SEED = 3
NAME_TO_ID = {name: i for i, name in phantom_labels().items()}


@pytest.fixture(scope="module")
def phantom_3mm():
    ct, lab = make_phantom(SEED, spacing=(3.0, 3.0, 3.0))
    return ct, lab, np.asarray(ct.dataobj), np.asarray(lab.dataobj)


def _centroid_mm(lab: nib.Nifti1Image, name: str) -> np.ndarray:
    ijk = np.argwhere(np.asarray(lab.dataobj) == NAME_TO_ID[name]).mean(axis=0)
    return nib.affines.apply_affine(lab.affine, ijk)


def test_labels_are_real_total_ids_and_all_present(phantom_3mm):
    from totalsegmentator.map_to_binary import class_map

    labels = phantom_labels()
    assert all(class_map["total"][i] == name for i, name in labels.items())
    *_, lab = phantom_3mm
    assert lab.dtype == np.uint8
    assert set(np.unique(lab)) - {0} == set(labels)


def test_every_normal_mode_part_has_something_to_segment():
    from totalsegmentator.map_to_binary import (
        class_map_5_parts,
        map_taskid_to_partname_ct,
    )

    names = set(phantom_labels().values())
    for task_id in (291, 292, 293, 294, 295):
        part = map_taskid_to_partname_ct[task_id]
        assert names & set(class_map_5_parts[part].values()), f"Dataset{task_id} ({part}) has nothing"


@pytest.mark.parametrize(
    "name, lo, hi",
    [
        ("lung_upper_lobe_left", -900, -820),
        ("lung_lower_lobe_right", -850, -750),
        ("liver", 80, 140),
        ("spleen", 100, 150),
        ("kidney_left", 150, 220),
        ("aorta", 130, 200),
        ("urinary_bladder", -10, 35),
        ("autochthon_right", 30, 80),
        ("vertebrae_L3", 250, 400),
        ("rib_left_11", 350, 600),
    ],
)
def test_structure_hu_is_realistic(phantom_3mm, name, lo, hi):
    *_, ct, lab = phantom_3mm
    assert lo <= np.median(ct[lab == NAME_TO_ID[name]]) <= hi


def test_ct_is_int16_hu_with_air_fat_and_noise(phantom_3mm):
    ct_img, lab_img, ct, lab = phantom_3mm
    assert ct.dtype == np.int16 and ct_img.get_data_dtype() == np.int16
    assert np.median(ct[:5, -5:, :]) < -950  # anterior corners are air
    liver = ct[lab == NAME_TO_ID["liver"]]
    assert 8 <= liver.std() <= 30  # noise sigma ~15 HU
    # subcutaneous fat: world point 10 mm inside the anterior body wall at mid-height
    ijk = np.round(nib.affines.apply_affine(np.linalg.inv(ct_img.affine), _anterior_fat_point(ct_img))).astype(int)
    assert -140 <= ct[tuple(ijk)] <= -60


def _anterior_fat_point(ct_img) -> np.ndarray:
    """Walk down from the anterior FOV edge along the midline until the body starts, then 8 mm deeper."""
    ct = np.asarray(ct_img.dataobj)
    i0 = int(round(nib.affines.apply_affine(np.linalg.inv(ct_img.affine), [0, 0, 0])[0]))
    k0 = ct.shape[2] // 2
    column = ct[i0, :, k0]
    first_body = np.nonzero(column[::-1] > -500)[0][0]
    j = ct.shape[1] - 1 - first_body
    world = nib.affines.apply_affine(ct_img.affine, [i0, j, k0])
    return world - np.array([0.0, 8.0, 0.0])


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SPL"])
def test_anatomy_sides_in_world_mm(orientation):
    """RAS+ world: +x is the patient's right, +y anterior, +z superior, whatever the array orientation."""
    _, lab = make_phantom(SEED, spacing=4.0, axcodes=orientation)
    assert "".join(nib.aff2axcodes(lab.affine)) == orientation
    c = {
        n: _centroid_mm(lab, n)
        for n in (
            "kidney_left",
            "kidney_right",
            "liver",
            "spleen",
            "heart",
            "urinary_bladder",
            "vertebrae_L3",
            "lung_upper_lobe_left",
        )
    }
    assert c["kidney_left"][0] < -30 < 30 < c["kidney_right"][0]
    assert c["liver"][0] > 0 > c["spleen"][0]
    assert c["heart"][0] < c["liver"][0]
    assert c["urinary_bladder"][1] > c["vertebrae_L3"][1]  # bladder anterior of the spine
    assert c["lung_upper_lobe_left"][2] > c["liver"][2] > c["urinary_bladder"][2]


def test_same_patient_on_any_grid():
    """The phantom is analytic: RAS vs LPS storage and 3 vs 5 mm spacing give the same organs in world mm."""
    _, ras = make_phantom(SEED, spacing=(3.0,) * 3)
    _, lps = make_phantom(SEED, spacing=(3.0,) * 3, axcodes="LPS")
    _, coarse = make_phantom(SEED, spacing=(5.0,) * 3)
    np.testing.assert_array_equal(np.asarray(lps.dataobj), np.asarray(ras.dataobj)[::-1, ::-1, :])
    for name in ("liver", "kidney_left", "aorta", "vertebrae_L1"):
        np.testing.assert_allclose(_centroid_mm(coarse, name), _centroid_mm(ras, name), atol=2.5)
        ml = [
            (np.asarray(img.dataobj) == NAME_TO_ID[name]).sum() * np.prod(img.header.get_zooms()) / 1000
            for img in (ras, coarse)
        ]
        assert ml[1] == pytest.approx(ml[0], rel=0.08)


def test_same_seed_same_phantom_other_seed_other_patient():
    a_ct, a_lab = make_phantom(11, spacing=(6.0,) * 3)
    b_ct, b_lab = make_phantom(11, spacing=(6.0,) * 3)
    c_ct, c_lab = make_phantom(12, spacing=(6.0,) * 3)
    np.testing.assert_array_equal(np.asarray(a_ct.dataobj), np.asarray(b_ct.dataobj))
    np.testing.assert_array_equal(np.asarray(a_lab.dataobj), np.asarray(b_lab.dataobj))
    np.testing.assert_array_equal(a_ct.affine, b_ct.affine)
    assert (np.asarray(a_lab.dataobj) != np.asarray(c_lab.dataobj)).mean() > 0.01
