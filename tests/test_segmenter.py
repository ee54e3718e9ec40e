"""The segmentation engine against vanilla TotalSegmentator, on the project's made weights.

Vanilla is ``totalsegmentator.python_api.totalsegmentator`` itself, run in this process on the same weights
folder, so every parity assertion compares our in-memory path with the code users run today.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch

from ray_app.core.errors import WeightsMissing
from ray_app.core.segmenter import Segmenter
from ray_app.demo.phantom import make_phantom, phantom_labels
from ray_app.settings import Settings
from tests.guards import audit

pytestmark = pytest.mark.slow

EXAMPLE_SM = "example_ct_sm.nii.gz"


def vanilla(img: nib.Nifti1Image, **kwargs) -> np.ndarray:
    from totalsegmentator.python_api import totalsegmentator

    out = totalsegmentator(img, None, device="cpu", quiet=True, **kwargs)
    return np.asanyarray(out.dataobj).astype(np.uint8)


def odd_grid_phantom(seed: int) -> nib.Nifti1Image:
    """A phantom on an LPS, anisotropic grid of odd size: the geometry TotalSegmentator must undo exactly."""
    affine = np.diag([-1.9, -2.3, 3.7, 1.0])
    affine[:3, 3] = [170.0, 150.0, -200.0]
    ct, _ = make_phantom(seed, shape=(175, 141, 97), affine=affine)
    return ct


@pytest.fixture(scope="module")
def fast_segmenter(phantom_weights):
    return Segmenter(fast=True, device="cpu", settings=Settings())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * np.logical_and(a, b).sum() / denom


def test_fast_mask_equals_vanilla_on_real_ct(fast_segmenter, example_dir):
    img = nib.load(example_dir / EXAMPLE_SM)
    ours = fast_segmenter.segment(img).mask
    assert ours.shape == img.shape and np.allclose(ours.affine, img.affine)
    assert ours.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), vanilla(img, fast=True))


def test_fast_mask_equals_vanilla_on_lps_anisotropic_odd_grid(fast_segmenter):
    img = odd_grid_phantom(seed=101)
    ours = fast_segmenter.segment(img).mask
    assert ours.shape == img.shape and np.array_equal(ours.affine, img.affine)
    mask = np.asanyarray(ours.dataobj)
    assert len(np.unique(mask)) > 5, "the phantom should be segmented into several organs"
    np.testing.assert_array_equal(mask, vanilla(img, fast=True))


def test_normal_mode_merges_five_part_models_like_vanilla(phantom_weights, example_dir):
    seg = Segmenter(fast=False, device="cpu", settings=Settings())
    assert [s.task_id for s in seg.spec.stages] == [291, 292, 293, 294, 295]
    affine = np.diag([-2.5, -2.5, 3.5, 1.0])
    affine[:3, 3] = [60.0, 40.0, -20.0]
    small_lps = make_phantom(104, shape=(51, 43, 23), affine=affine)[0]  # 1.5 mm makes every voxel 5-10
    for img in (small_lps, nib.load(example_dir / EXAMPLE_SM)):
        ours = np.asanyarray(seg.segment(img).mask.dataobj)
        np.testing.assert_array_equal(ours, vanilla(img, fast=False))


def test_roi_subset_crops_and_filters_like_vanilla(phantom_weights):
    roi = ["liver", "kidney_left"]
    seg = Segmenter(fast=True, device="cpu", roi_subset=roi, settings=Settings())
    img = odd_grid_phantom(seed=103)
    ours = np.asanyarray(seg.segment(img).mask.dataobj)
    ids = {k for k, v in seg.spec.label_map.items() if v in roi}
    assert set(np.unique(ours)) - {0} <= ids and ids <= set(np.unique(ours))
    np.testing.assert_array_equal(ours, vanilla(img, fast=True, roi_subset=roi))


def test_made_model_segments_held_out_phantoms(fast_segmenter):
    """Dice >= 0.90 per phantom structure through the whole segmenter, on phantoms the model never saw."""
    names = phantom_labels()
    worst = {}
    for seed in (9001, 9002):
        ct, truth = make_phantom(seed)
        mask = np.asanyarray(fast_segmenter.segment(ct).mask.dataobj)
        gt = np.asanyarray(truth.dataobj)
        for label_id, name in names.items():
            worst[name] = min(worst.get(name, 1.0), dice(mask == label_id, gt == label_id))
    assert min(worst.values()) >= 0.90, worst


def test_three_scans_read_the_checkpoint_once(phantom_weights, example_dir):
    img = nib.load(example_dir / EXAMPLE_SM)
    with audit() as events:
        seg = Segmenter(fast=True, device="cpu", settings=Settings())
        for _ in range(3):
            seg.segment(img)
    reads = [e for e in events.opens() if str(e).endswith("checkpoint_final.pth")]
    assert len(reads) == 1, reads
    assert seg.checkpoint_loads == 1


def test_segmenting_writes_no_files_spawns_nothing_and_stays_offline(fast_segmenter, example_dir):
    img = nib.load(example_dir / EXAMPLE_SM)
    fast_segmenter.segment(img)  # warm: first calls may import modules lazily
    with audit() as events:
        fast_segmenter.segment(img)
    assert events.writes() == [], events.writes()
    assert events.spawns() == [], events.spawns()
    assert events.connections() == [], events.connections()


def test_missing_weights_fail_fast_with_a_clear_message_and_write_nothing(tmp_path, monkeypatch):
    empty = tmp_path / "weights"
    empty.mkdir()
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(empty))
    start = time.monotonic()
    with pytest.raises(WeightsMissing) as err:
        Segmenter(fast=True, device="cpu", settings=Settings())
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in message and "TOTALSEG_WEIGHTS_PATH" in message
    assert list(empty.iterdir()) == []


def test_torch_threads_follow_the_cpus_given_not_the_machine_and_the_passport_says_how_many(
    phantom_weights, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        one = Segmenter(fast=True, device="cpu", settings=Settings())
        assert torch.get_num_threads() == 1 and one.model_info["torch_threads"] == 1
        two = Segmenter(fast=True, device="cpu", num_threads=2, settings=Settings())
        assert torch.get_num_threads() == 2 and two.model_info["torch_threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_usage_statistics_are_off_in_totalsegmentator_config(fast_segmenter):
    from totalsegmentator.config import get_config

    assert get_config()["send_usage_stats"] is False


@pytest.mark.parametrize(
    "shape,target",
    [
        ((133, 133, 150), (512, 512, 300)),
        ((45, 38, 61), (89, 71, 97)),
        ((60, 50, 40), (31, 77, 40)),
        ((1, 7, 9), (3, 7, 2)),
        ((57, 43, 29), (175, 141, 97)),
    ],
)
def test_resampling_back_gives_totalsegmentators_labels_exactly(shape, target):
    from totalsegmentator.resampling import change_spacing

    from ray_app.core.stages import resample_labels

    seg = np.random.default_rng(sum(shape)).integers(0, 118, shape, dtype=np.uint8)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    img_in_affine = np.diag([1.1, 0.9, 2.0, 1.0])
    vanilla_img = change_spacing(
        nib.Nifti1Image(seg, affine), [3.0] * 3, target, order=0, dtype=np.uint8, nr_cpus=1, force_affine=img_in_affine
    )
    ours = resample_labels(seg, target)
    assert ours.dtype == np.uint8 and ours.shape == vanilla_img.shape == target
    np.testing.assert_array_equal(ours, np.asanyarray(vanilla_img.dataobj))
