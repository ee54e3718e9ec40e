"""``ray-app`` as a user runs it: option checks that stop before anything starts, and ``segment``, ``demo`` and
``serve`` as commands in their own processes (their exit codes, what they print, what they leave behind)."""

from __future__ import annotations

import gzip
import io
import os
import secrets
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from ray_app import cli
from ray_app.phantom import make_phantom
from tests._ray import free_port, stop_process
from tests.conftest import REPO

MODEL = "total_fast"


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray_app.cli", *args]


def _env(**extra: str) -> dict[str, str]:
    """This worktree's code first (the venv may hold an editable install of another checkout)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def _small_phantom(path: Path) -> Path:
    """An abdominal crop that fits one network tile at 3 mm: seconds to segment."""
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-142.5, -118.5, -133.5)
    ct = make_phantom(7, affine=affine, shape=(96, 80, 80))[0]
    nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), ct.affine), path)
    return path


# ------------------------------------------------------------------------------------------ option checks


def _batch_args(*extra: str):
    return cli.build_parser().parse_args(["batch", "--manifest", "m.csv", "--output", "out", *extra])


def test_device_cuda_reserves_one_gpu_per_actor_unless_told_otherwise():
    """Without a GPU request Ray gives a cuda actor no GPU: it sees none and fails at construction. So the GPU
    request follows the device: 1 per actor with cuda (a share with --gpus-per-actor), none with cpu."""
    assert cli.batch_config(_batch_args("--device", "cuda")).gpus_per_actor == 1.0
    assert cli.batch_config(_batch_args("--device", "cuda", "--gpus-per-actor", "0.5")).gpus_per_actor == 0.5
    assert cli.batch_config(_batch_args("--device", "cpu")).gpus_per_actor == 0.0
    assert cli.batch_config(_batch_args()).gpus_per_actor == 0.0


@pytest.mark.parametrize("options, message", [
    (["--device", "cuda", "--gpus-per-actor", "0"], "--device cuda needs a GPU per actor"),
    (["--device", "cpu", "--gpus-per-actor", "1"], "reserves GPUs that --device cpu actors never use"),
])
def test_contradictory_device_options_stop_at_the_start_with_one_message(options, message, capsys):
    # The manifest does not exist: a run that got past the check would fail on it instead of exiting 2.
    assert cli.main(["batch", "--manifest", "/nonexistent/m.csv", "--output", "/nonexistent/out", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_unusable_manifest_exits_2_before_anything_runs(tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,path\na,/x.nii.gz\n")
    assert cli.main(["batch", "--manifest", str(manifest), "--output", str(tmp_path / "out")]) == 2
    assert "uri" in capsys.readouterr().err
    assert not (tmp_path / "out" / "_jobs").exists()


def test_serve_derives_its_gpu_request_from_the_device(monkeypatch):
    from ray_app.serve_app import build_app

    monkeypatch.setenv("RAY_APP_API_TOKEN", secrets.token_hex(16))
    options = build_app({"settings": {"device": "cuda"}})._bound_deployment.ray_actor_options
    assert options["num_gpus"] == 1.0
    assert build_app({})._bound_deployment.ray_actor_options["num_gpus"] == 0.0
    with pytest.raises(ValueError, match="needs a GPU per replica"):
        build_app({"num_gpus": 0, "settings": {"device": "cuda"}})


# ------------------------------------------------------------------------------------------ commands


@pytest.mark.slow
def test_demo_command_ends_in_success_when_only_its_corrupt_input_failed(phantom_weights, tmp_path):
    """The README's first command: the corrupt input failing is the demo working, so the exit code is 0."""
    done = subprocess.run(_command("demo", "--out", str(tmp_path / "demo"), "--scans", "1"), env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "truncated" in done.stdout and "truncated_file" in done.stdout
    assert "demo: as intended: 1 phantoms segmented, the corrupt file recorded as a failure" in done.stdout
    results = tmp_path / "demo" / "results"
    assert (results / "phantom-01" / MODEL / "mask.nii.gz").is_file()
    assert (results / "phantom-01" / MODEL / "preview.png").is_file()
    assert (results / "passports.sqlite").is_file()
