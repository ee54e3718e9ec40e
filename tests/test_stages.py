"""The batch job's stage split: what reaches the inference actor, and resource shapes that can always run."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ray_app.adapters import batch
from ray_app.adapters.batch import BatchConfig, plan_shape
from ray_app.core import stages
from ray_app.core.errors import PreflightError
from ray_app.core.totalseg import task_spec
from ray_app.demo.phantom import make_phantom
from ray_app.settings import Settings


def _cfg(**kw) -> BatchConfig:
    return BatchConfig(manifest="m.csv", output="out", **kw)


def test_the_reported_hang_is_refused_at_the_start_with_one_message():
    """``--cpus-per-actor 2 --max-actors 1`` on 2 CPUs: the actor held both and the fetch tasks never ran."""
    with pytest.raises(PreflightError) as err:
        plan_shape(_cfg(cpus_per_actor=2, max_actors=1), {"CPU": 2.0})
    assert "would wait forever" in err.value.message and "--cpus-per-actor 1.8" in err.value.message


@pytest.mark.parametrize(
    "kw,cluster",
    [
        ({"cpus_per_actor": 1, "min_actors": 2}, {"CPU": 2.0}),
        ({"device": "cuda"}, {"CPU": 8.0}),
        ({"device": "cuda", "gpus_per_actor": 1, "min_actors": 2}, {"CPU": 8.0, "GPU": 1.0}),
    ],
)
def test_shapes_the_cluster_can_never_run_are_refused(kw, cluster):
    with pytest.raises(PreflightError):
        plan_shape(_cfg(**kw), cluster)


def test_every_accepted_shape_leaves_the_cpu_stages_room_beside_the_actors():
    for cpus in (1, 2, 3, 16):
        for kw in (
            {},
            {"cpus_per_actor": 1},
            {"max_actors": 8},
            {"cpus_per_actor": 0.5, "max_actors": 9},
            {"roi_subset": ("liver",)},
            {"roi_subset": ("liver",), "cpus_per_actor": 1},
        ):
            try:
                shape = plan_shape(_cfg(**kw), {"CPU": float(cpus)})
            except PreflightError:  # e.g. 1-CPU actors on 1 CPU: refused, not hung
                continue
            pools = 2 if kw.get("roi_subset") else 1
            used = pools * shape.max_actors * shape.cpus_per_actor
            assert used + batch.STAGE_CPUS <= cpus + 1e-9, (cpus, kw, shape)
            assert 1 <= shape.min_actors <= shape.max_actors and shape.threads >= 1


def test_unflagged_jobs_fill_the_machine_with_vanillas_thread_count():
    """On CPU one actor per node with the node's threads (vanilla's count, so its masks are vanilla's), one
    actor per GPU on cuda."""
    cpu = plan_shape(_cfg(), {"CPU": 2.0})
    assert (cpu.min_actors, cpu.max_actors, cpu.cpus_per_actor, cpu.threads) == (1, 1, 1.8, 2)
    three = plan_shape(_cfg(), {"CPU": 24.0}, [8.0, 8.0, 8.0])
    assert (three.max_actors, three.threads) == (3, 8), "one actor per node: Ray places one 7.8-CPU actor a node"
    roi = plan_shape(_cfg(roi_subset=("liver",)), {"CPU": 2.0})
    assert (roi.max_actors, roi.cpus_per_actor, roi.threads) == (1, 0.9, 2), "each pass: half the room, all threads"
    gpu = plan_shape(_cfg(device="cuda"), {"CPU": 16.0, "GPU": 2.0})
    assert (gpu.min_actors, gpu.max_actors, gpu.gpus_per_actor, gpu.cpus_per_actor) == (2, 2, 1.0, 1.0)
    assert gpu.task_concurrency == 14, "the CPU stages get the cores the GPU actors leave"
    pinned = plan_shape(_cfg(actor_resources={"spot_cpu": 1}, cpus_per_actor=7.9), {"CPU": 0.0})
    assert (pinned.min_actors, pinned.max_actors, pinned.threads) == (1, 2, 8)
    assert pinned.task_concurrency == 1, "pinned CPU actors: a CPU-stage task per two actors (prepare, finish)"


def test_an_actor_asked_for_most_of_the_machine_runs_a_thread_per_core():
    """``--cpus-per-actor 1.8 --max-actors 1`` on 2 CPUs: the CPU stages' 0.2 is a token, the actor gets both
    cores' threads."""
    shape = plan_shape(_cfg(cpus_per_actor=1.8, max_actors=1), {"CPU": 2.0})
    assert (shape.max_actors, shape.threads) == (1, 2)
    wide = plan_shape(_cfg(cpus_per_actor=1.5), {"CPU": 16.0})
    assert wide.max_actors == 10, "as many actors of the size asked for as fit beside the CPU stages"
    assert wide.threads == 1, "half a core short is not a core"


@pytest.mark.slow
def test_the_actor_stage_receives_the_model_grid_array_not_the_ct(ray_cluster, tmp_path):
    """What Ray Data hands the inference actor for a 0.8 mm CT is its 3 mm array (int16), not the scan: measured
    as the prepare stage's output blocks. The scan waits aside for the finish stage, read from its source if lost."""
    import ray

    affine = np.diag([-0.8, -0.8, 1.0, 1.0])
    ct, _ = make_phantom(7, shape=(256, 240, 120), affine=affine)
    path = tmp_path / "ct.nii.gz"
    nib.save(ct, path)
    spec = task_spec("total", fast=True)
    grid = stages.first_pass(spec, ct)
    assert grid.data.dtype == np.int16 and grid.nbytes < ct.get_fdata().astype(np.int16).nbytes / 20

    aside = ray.remote(batch._Aside).remote()
    try:
        row = {"scan_id": "s1", "uri": str(path)}
        prepared = ray.data.from_items([row]).map(batch._make_preparer(spec, aside)).materialize()
        crossing = prepared.size_bytes()
        assert grid.nbytes <= crossing <= grid.nbytes + 16_384, (crossing, grid.nbytes)
        (out,) = prepared.take_all()
        assert out["error_code"] == "" and np.array_equal(batch.pickle.loads(out["prepared"]).data, grid.data)
        held = batch._scan_from_aside(aside, row, take=True)
        reread = batch._scan_from_aside(aside, row, take=True)  # taken: read again from the source
        np.testing.assert_array_equal(held.image.get_fdata(), reread.image.get_fdata())
    finally:
        ray.kill(aside)


@pytest.mark.slow
def test_roi_subset_through_the_batch_stages_gives_the_in_process_mask(ray_cluster, example_dir, tmp_path):
    """roi_subset's extra round (6 mm pass, crop task, main pass on a second pool) ends in the mask the one-process
    chain makes, which test_segmenter holds equal to vanilla's."""
    from ray_app.adapters.batch import run_batch
    from ray_app.core.segmenter import Segmenter

    roi = ("liver", "kidney_left")
    src = example_dir / "example_ct_sm.nii.gz"
    (tmp_path / "m.csv").write_text(f"scan_id,uri\nsm,{src}\n")
    cfg = BatchConfig(manifest=str(tmp_path / "m.csv"), output=str(tmp_path / "out"), roi_subset=roi)
    report = run_batch(cfg)
    assert report.succeeded == 1, report.rows
    (mask_path,) = (tmp_path / "out" / "sm").glob("*/mask.nii.gz")
    ours = Segmenter(fast=True, device="cpu", roi_subset=list(roi), settings=Settings()).segment(nib.load(src)).mask
    np.testing.assert_array_equal(np.asanyarray(nib.load(mask_path).dataobj), np.asanyarray(ours.dataobj))
