"""The passport: TotalSegmentator's own statistics are the oracle for volumes, mean HU and the border rule; the
schema accepts what we write and refuses what we must not write."""

from __future__ import annotations

import copy
import json
import time

import jsonschema
import nibabel as nib
import numpy as np
import pytest
from totalsegmentator.map_to_binary import class_map
from totalsegmentator.statistics import get_basic_statistics, touches_border

from ray_app.core import errors
from ray_app.core.passport import (
    build_passport,
    failure_passport,
    passport_schema,
    validate_passport,
)
from ray_app.core.scan import load_scan, scan_from_image
from ray_app.settings import Settings
from tests import _scan_factory as f

LABELS = class_map["total"]
MODEL = {"task": "total", "mode": "fast", "versions": {"totalsegmentator": "2.18.0"}}


@pytest.fixture(scope="module")
def example():
    scan = load_scan(f.CT_SM, "example-sm", Settings())
    mask = np.asanyarray(nib.load(f.SEG_FAST).dataobj)
    doc = build_passport(scan, mask, label_map=LABELS, model=MODEL, timings={"segment": 1.5}, settings=Settings())
    return scan, mask, doc


def test_volumes_and_mean_hu_equal_totalsegmentators_statistics(example):
    """example_seg_fast_statistics.json was written by TotalSegmentator (--statistics --stats_include_incomplete):
    volume in mm3 (unrounded), mean intensity rounded to 5 decimals, 0.0 for both when a class is absent."""
    _, _, doc = example
    oracle = json.loads(f.STATS_FAST.read_text())
    assert set(doc["structures"]) == set(oracle) == set(LABELS.values())
    for name, expected in oracle.items():
        got = doc["structures"][name]
        assert got["volume_ml"] * 1000 == pytest.approx(expected["volume"], rel=1e-3, abs=1e-9), name
        if expected["volume"] == 0:
            assert got["voxel_count"] == 0 and got["mean_hu"] is None and got["std_hu"] is None, name
        else:
            assert got["mean_hu"] == pytest.approx(expected["intensity"], rel=1e-3, abs=1e-3), name
    assert sum(s["voxel_count"] > 0 for s in doc["structures"].values()) == 40


def test_incomplete_is_totalsegmentators_border_rule(example):
    """Exactly the structures TotalSegmentator's default statistics zero out for touching the border."""
    scan, mask, doc = example
    default = get_basic_statistics(mask, scan.image, quiet=True, exclude_masks_at_border=True)
    for label_id, name in LABELS.items():
        structure = doc["structures"][name]
        assert structure["incomplete"] == touches_border(mask == label_id), name
        zeroed_by_ts = default[name]["volume"] == 0 and structure["voxel_count"] > 0
        assert structure["incomplete"] == zeroed_by_ts, name
    assert sum(s["incomplete"] for s in doc["structures"].values()) > 0


def test_passport_is_valid_strict_json(example):
    scan, _, doc = example
    validate_passport(doc)
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["schema_version"] == "1.0" and doc["status"] == "ok" and doc["created_at"].endswith("Z")
    assert doc["scan"]["orientation"] == "RAS" and doc["scan"]["shape"] == [122, 101, 30]
    assert doc["scan"]["hu_range"] == [-1100.0, 1207.0]
    assert doc["rules"] == {"presence_threshold_ml": 0.5, "border_voxels": 3}
    validate_passport({**doc, "outputs": {"mask": "s3://bucket/example-sm/mask.nii.gz"}})  # added by the writer


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("structures"),
        lambda d: d["structures"]["liver"].pop("incomplete"),
        lambda d: d["structures"]["liver"].update(volume_ml=-1.0),
        lambda d: d["structures"]["liver"].update(centroid_mm=[1.0, 2.0]),
        lambda d: d.update(status="failed"),  # failed without an error
        lambda d: d.update(status="maybe"),
        lambda d: d.update(outputs={"mask": 3}),
        lambda d: d.update(schema_version="2.0"),
        lambda d: d.update(created_at="yesterday"),
        lambda d: d["model"].pop("task"),
        lambda d: d["timings"].update(segment=-3),
        lambda d: d["scan"].pop("spacing_mm"),
        lambda d: d["structures"]["liver"].update(mean_hu=float("nan")),
    ],
)
def test_schema_refuses_malformed_passports(example, breakage):
    doc = copy.deepcopy(example[2])
    breakage(doc)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_passport(doc)


def test_schema_is_draft_2020_12_and_states_the_rules():
    schema = passport_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    structure = schema["$defs"]["structure"]["properties"]
    assert "volume_ml > rules.presence_threshold_ml" in structure["present"]["description"]
    assert "touches_border" in structure["incomplete"]["description"]


def test_presence_threshold_and_world_geometry():
    """A cube's centroid and box in world mm, on a flipped, shifted (LPS-like) grid; presence by threshold."""
    shape = (40, 30, 20)
    affine = np.array([[-2.0, 0, 0, 100], [0, -2.0, 0, 50], [0, 0, 3.0, -30], [0, 0, 0, 1]])
    ct = f.ct_like(shape)
    scan = scan_from_image(nib.Nifti1Image(ct, affine), "geom", Settings())
    mask = np.zeros(shape, np.uint8)
    mask[10:20, 5:15, 4:10] = 5  # liver: 600 voxels x 12 mm3 = 7.2 ml
    mask[30, 20, 12] = 1  # spleen: one voxel, 0.012 ml
    settings = Settings(presence_threshold_ml=1.0)
    doc = build_passport(scan, mask, label_map=LABELS, model=MODEL, timings={}, settings=settings)
    validate_passport(doc)
    liver, spleen, aorta = (doc["structures"][n] for n in ("liver", "spleen", "aorta"))

    assert liver["present"] and liver["volume_ml"] == pytest.approx(7.2) and liver["voxel_count"] == 600
    assert liver["mean_hu"] == pytest.approx(ct[mask == 5].mean(), abs=1e-3)
    assert liver["std_hu"] == pytest.approx(ct[mask == 5].std(), abs=1e-3)
    assert liver["bbox_voxels"] == {"min": [10, 5, 4], "max": [19, 14, 9]}
    centre = nib.affines.apply_affine(affine, [14.5, 9.5, 6.5])
    assert liver["centroid_mm"] == pytest.approx(centre.tolist())
    assert liver["bbox_mm"] == {"min": [62.0, 22.0, -18.0], "max": [80.0, 40.0, -3.0]}
    assert liver["incomplete"] is False

    assert not spleen["present"] and spleen["voxel_count"] == 1 and spleen["mean_hu"] is not None
    assert spleen["incomplete"] is False
    assert not aorta["present"] and aorta["voxel_count"] == 0
    assert aorta["mean_hu"] is None and aorta["bbox_mm"] is None and aorta["centroid_mm"] is None
    assert aorta["incomplete"] is False


def test_structure_at_the_border_is_incomplete_but_measured():
    shape = (20, 20, 20)
    scan = scan_from_image(nib.Nifti1Image(f.ct_like(shape), np.eye(4)), "border", Settings())
    mask = np.zeros(shape, np.uint8)
    mask[5:10, 5:10, 17:20] = 5  # reaches within 3 voxels of the last slice
    doc = build_passport(scan, mask, label_map=LABELS, model=MODEL, timings={}, settings=Settings())
    liver = doc["structures"]["liver"]
    assert liver["incomplete"] and liver["voxel_count"] == 75 and liver["volume_ml"] == pytest.approx(0.075)


def test_scan_warnings_and_unknown_labels_are_reported():
    data = np.random.default_rng(1).uniform(0, 500, (12, 12, 12)).astype(np.float32)
    scan = scan_from_image(nib.Nifti1Image(data, np.eye(4)), "flagged", Settings(modality_policy="flag"))
    mask = np.zeros(data.shape, np.uint8)
    mask[4:8, 4:8, 4:8] = 200
    doc = build_passport(scan, mask, label_map=LABELS, model=MODEL, timings={}, settings=Settings())
    validate_passport(doc)
    assert doc["status"] == "ok"
    assert any(w.startswith("not_hounsfield") for w in doc["warnings"])
    assert any("[200]" in w for w in doc["warnings"])


def test_mask_on_another_grid_is_refused():
    scan = scan_from_image(nib.Nifti1Image(f.ct_like((10, 10, 10)), np.eye(4)), "grid", Settings())
    with pytest.raises(ValueError, match="shape"):
        build_passport(
            scan, np.zeros((10, 10, 9), np.uint8), label_map=LABELS, model=MODEL, timings={}, settings=Settings()
        )


def test_failure_passport_carries_the_error_code():
    doc = failure_passport(
        "bad-1",
        errors.MissingSlices("slices are missing", scan_id="bad-1"),
        MODEL,
        timings={"read": 0.1},
        source_uri="s3://b/bad-1/",
    )
    validate_passport(doc)
    assert doc["status"] == "failed" and doc["structures"] == {}
    assert doc["error"] == {"code": "missing_slices", "message": "slices are missing"}
    crash = failure_passport("bad-2", RuntimeError("boom"), MODEL)
    validate_passport(crash)
    assert crash["error"] == {"code": "internal_error", "message": "RuntimeError: boom"}
    oom = failure_passport("bad-3", model=MODEL, code="out_of_memory", message="too big")
    validate_passport(oom)
    assert oom["error"]["code"] == "out_of_memory"


def test_large_volume_is_fast():
    """512x512x300 with every class: one pass over the volume, not one per class (about 0.2 s on an idle core;
    the bound leaves room for a shared machine)."""
    shape = (512, 512, 300)
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, size=shape, dtype=np.int16)
    ct[0, 0, 0] = -1000
    coarse = rng.integers(0, 118, size=(16, 16, 10), dtype=np.uint8)
    mask = np.repeat(np.repeat(np.repeat(coarse, 32, 0), 32, 1), 30, 2)
    scan = scan_from_image(nib.Nifti1Image(ct, np.diag([0.8, 0.8, 1.5, 1])), "big", Settings())
    start = time.perf_counter()
    doc = build_passport(scan, mask, label_map=LABELS, model=MODEL, timings={}, settings=Settings())
    elapsed = time.perf_counter() - start
    assert sum(s["present"] for s in doc["structures"].values()) == 117
    assert elapsed < 5, f"passport took {elapsed:.1f} s"


def _reference(ct: np.ndarray, mask: np.ndarray, label_id: int) -> dict:
    """One structure's statistics the slow, obvious way: the voxels of that label, one class at a time."""
    idx = np.nonzero(mask == label_id)
    hu = ct[idx].astype(np.float64)
    return {
        "voxel_count": int(idx[0].size),
        "mean_hu": float(hu.mean()),
        "std_hu": float(hu.std()),
        "bbox_voxels": {"min": [int(i.min()) for i in idx], "max": [int(i.max()) for i in idx]},
        "centroid_voxels": [float(i.mean()) for i in idx],
    }


@pytest.mark.parametrize("layout", ["as_loaded", "c_order", "random_labels_lps"])
def test_statistics_equal_a_per_label_reference_in_either_memory_order(example, layout):
    """The one-pass statistics against per-label masks, on the example CT as nibabel loads it (Fortran order), a
    C-ordered copy, and labels whose runs are one voxel long on an LPS grid."""
    scan, mask, _ = example
    ct = np.asanyarray(scan.image.dataobj)
    affine = scan.affine
    if layout == "c_order":
        ct, mask = np.ascontiguousarray(ct), np.ascontiguousarray(mask)
    elif layout == "random_labels_lps":
        mask = np.random.default_rng(5).integers(0, 40, mask.shape, dtype=np.uint8)
        affine = np.diag([-1.5, -2.0, 2.5, 1.0])
    scan = scan_from_image(nib.Nifti1Image(ct, affine), "ref", Settings())
    doc = build_passport(scan, mask, label_map=LABELS, model=MODEL, timings={}, settings=Settings())
    for label_id in map(int, np.unique(mask[mask > 0])):
        got, want = doc["structures"][LABELS[label_id]], _reference(ct, mask, label_id)
        assert got["voxel_count"] == want["voxel_count"] and got["bbox_voxels"] == want["bbox_voxels"]
        assert got["mean_hu"] == pytest.approx(want["mean_hu"], rel=1e-3, abs=1e-3)
        assert got["std_hu"] == pytest.approx(want["std_hu"], rel=1e-3, abs=1e-3)
        centroid = nib.affines.apply_affine(affine, want["centroid_voxels"])
        assert got["centroid_mm"] == pytest.approx(centroid, abs=1e-3)
