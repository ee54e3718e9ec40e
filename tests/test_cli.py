"""``ray-app`` as a user runs it: option checks that stop before anything starts, and ``segment``, ``demo`` and
``serve`` as commands in their own processes (their exit codes, what they print, what they leave behind)."""

from __future__ import annotations

import gzip
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

from ray_app.adapters import cli
from ray_app.demo.phantom import make_phantom
from tests._ray import free_port, stop_process
from tests.conftest import REPO

MODEL = "total_fast"


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray_app.adapters.cli", *args]


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


@pytest.mark.parametrize(
    "options, message",
    [
        (["--device", "cuda", "--gpus-per-actor", "0"], "--device cuda needs a GPU per actor"),
        (["--device", "cpu", "--gpus-per-actor", "1"], "reserves GPUs that --device cpu actors never use"),
    ],
)
def test_contradictory_device_options_stop_at_the_start_with_one_message(options, message, capsys):
    # The manifest does not exist: a run that got past the check would fail on it instead of exiting 2.
    assert cli.main(["batch", "--manifest", "/nonexistent/m.csv", "--output", "/nonexistent/out", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_s3_output_without_a_passport_store_stops_at_the_start_with_one_message(capsys):
    """An S3 output has no local folder for the embedded SQLite store (found as a new user: it was a traceback)."""
    assert cli.main(["batch", "--manifest", "/nonexistent/m.csv", "--output", "s3://out/results"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "error: an s3:// output needs a passport store: --table NAME (DynamoDB) or --passports sqlite:///PATH\n"
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-actors", "0"], "argument --max-actors: 0 is not at least 1"),
        (["--cpus-per-actor", "-1"], "argument --cpus-per-actor: -1 is not more than 0"),
        (["--limit", "-3"], "argument --limit: -3 is not at least 1"),
        (["--actor-memory-gb", "0"], "argument --actor-memory-gb: 0 is not more than 0"),
        (["--min-actors", "two"], "argument --min-actors: invalid int value: 'two'"),
    ],
)
def test_counts_and_sizes_out_of_range_are_refused_by_the_parser(options, message, capsys):
    """Before: --cpus-per-actor -1 was Ray's traceback after start-up; --limit -3 ran no scan and exited 0."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["batch", "--manifest", "/nonexistent/m.csv", "--output", "/nonexistent/out", *options])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_roi_subset_stops_at_the_start_with_one_message(capsys):
    assert cli.main(["batch", "--manifest", "/nonexistent/m.csv", "--output", "/o", "--roi-subset", "livr"]) == 2
    assert capsys.readouterr().err == "error: invalid_roi_subset: roi_subset names unknown structures: livr\n"


@pytest.mark.parametrize("command", ["segment", "batch"])
def test_weights_that_cannot_be_downloaded_stop_the_command_with_one_line_and_no_scan_run(command, tmp_path):
    """No weights and a download that fails (here: a proxy on loopback that does not answer): ``segment`` and
    ``batch`` exit 2 naming the weights folder and how to fill it, where they printed a traceback (batch after Ray
    started and its actor failed). The batch job downloads in its preflight, once, before Ray starts."""
    weights = tmp_path / "weights"
    weights.mkdir()
    scan = _small_phantom(tmp_path / "ct.nii.gz")
    (tmp_path / "m.csv").write_text(f"scan_id,uri\nct,{scan}\n")
    out = tmp_path / "out"
    args = [str(scan), "--out", str(out)] if command == "segment" else ["--manifest", str(tmp_path / "m.csv")]
    proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = _env(TOTALSEG_WEIGHTS_PATH=str(weights), HTTPS_PROXY=proxy, https_proxy=proxy, NO_PROXY="", no_proxy="")
    done = subprocess.run(
        _command(command, *args, *(["--output", str(out)] if command == "batch" else [])),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in lines[0] and "The download failed" in lines[0]
    assert "TOTALSEG_WEIGHTS_PATH" in lines[0] and "Traceback" not in done.stdout + done.stderr
    assert not (out / "ct").exists() and not (out / "_jobs").exists()


@pytest.mark.parametrize(
    "destination, message",
    [
        (["--output", "{file}"], "passport store sqlite:///{file}/passports.sqlite is not usable: cannot open"),
        (["--output", "{tmp}/out", "--passports", "mysql://db"], "unsupported passport store 'mysql://db'"),
        (["--output", "{tmp}/out", "--passports", "dynamodb://t"], "invalid DynamoDB table name in 'dynamodb://t'"),
        (
            ["--output", "gs://b/out", "--passports", "sqlite:///{tmp}/p.sqlite"],
            "cannot write under gs://b/out: unsupported",
        ),
    ],
)
def test_an_unusable_destination_stops_at_the_start_with_one_line(
    destination, message, phantom_weights, monkeypatch, tmp_path, capsys
):
    """An output that is a file, a store URI with a typo, an output on another cloud: each was a traceback."""
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(phantom_weights))
    (tmp_path / "m.csv").write_text("scan_id,uri\nct,/ct.nii.gz\n")
    (tmp_path / "afile").write_text("x")
    fill = {"file": tmp_path / "afile", "tmp": tmp_path}
    options = [o.format(**fill) for o in destination]
    assert cli.main(["batch", "--manifest", str(tmp_path / "m.csv"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preflight_failed: ") and message.format(**fill) in err and err.count("\n") == 1, err


def test_an_unusable_manifest_exits_2_before_anything_runs(tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,path\na,/x.nii.gz\n")
    assert cli.main(["batch", "--manifest", str(manifest), "--output", str(tmp_path / "out")]) == 2
    assert "uri" in capsys.readouterr().err
    assert not (tmp_path / "out" / "_jobs").exists()


def test_a_manifest_that_does_not_exist_exits_2_naming_it_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "manfest.csv"
    assert cli.main(["batch", "--manifest", str(missing), "--output", str(tmp_path / "out")]) == 2
    assert f"error: invalid_manifest: manifest {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_serve_derives_its_gpu_request_from_the_device(monkeypatch):
    from ray_app.adapters.serve import build_app

    monkeypatch.setenv("RAY_APP_API_TOKEN", secrets.token_hex(16))
    options = build_app({"settings": {"device": "cuda"}})._bound_deployment.ray_actor_options
    assert options["num_gpus"] == 1.0
    assert build_app({})._bound_deployment.ray_actor_options["num_gpus"] == 0.0
    with pytest.raises(ValueError, match="needs a GPU per replica"):
        build_app({"num_gpus": 0, "settings": {"device": "cuda"}})


# ------------------------------------------------------------------------------------------ commands


@pytest.mark.slow
def test_segment_command_writes_each_scan_and_exits_1_only_when_one_failed(phantom_weights, example_dir, tmp_path):
    good = _small_phantom(tmp_path / "phantom.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "out"
    done = subprocess.run(
        _command(
            "segment",
            str(good),
            str(corrupt),
            str(example_dir / "example_ct_dicom"),
            "--scan-id",
            "phantom",
            "--scan-id",
            "corrupt",
            "--scan-id",
            "series",
            "--out",
            str(out),
            "--preview",
            "--per-structure",
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("phantom: ok, ") and "structures present" in line for line in lines), lines
    assert any(line.startswith("series: ok, ") for line in lines), lines
    assert "corrupt: FAILED truncated_file: " in done.stdout
    assert lines[-1] == "2 ok, 1 failed"
    for sid in ("phantom", "series"):
        files = {p.name for p in (out / sid).iterdir()}
        assert {"mask.nii.gz", "passport.json", "preview.png", "segmentations.zip"} <= files, files
    with zipfile.ZipFile(out / "phantom" / "segmentations.zip") as archive:
        names = archive.namelist()
        mask = np.asanyarray(nib.load(out / "phantom" / "mask.nii.gz").dataobj)
        assert names and len(names) == len(set(np.unique(mask)) - {0})
        one = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read("liver.nii.gz")))
        assert set(np.unique(np.asanyarray(one.dataobj))) == {0, 1}
    assert not (out / "corrupt").exists()  # a failed scan is reported, never written

    again = subprocess.run(
        _command("segment", str(good), "--out", str(tmp_path / "out2")),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert again.stdout.splitlines()[-1] == "1 ok, 0 failed"
    assert {p.name for p in (tmp_path / "out2" / "phantom").iterdir()} == {"mask.nii.gz", "passport.json"}


@pytest.mark.slow
def test_demo_command_ends_in_success_when_only_its_corrupt_input_failed(phantom_weights, tmp_path):
    """The README's first command: the corrupt input failing is the demo working, so the exit code is 0."""
    done = subprocess.run(
        _command("demo", "--out", str(tmp_path / "demo"), "--scans", "1"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "truncated" in done.stdout and "truncated_file" in done.stdout
    assert "demo: as intended: 1 phantoms segmented, the corrupt file recorded as a failure" in done.stdout
    results = tmp_path / "demo" / "results"
    assert (results / "phantom-01" / MODEL / "mask.nii.gz").is_file()
    assert (results / "phantom-01" / MODEL / "preview.png").is_file()
    assert (results / "passports.sqlite").is_file()


def test_serve_command_refuses_to_start_without_a_token(tmp_path):
    env = _env()
    for k in ("RAY_APP_API_TOKEN", "RAY_APP_API_TOKEN_FILE"):
        env.pop(k, None)
    done = subprocess.run(
        _command("serve", "--port", str(free_port())), env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: no API token: set RAY_APP_API_TOKEN")


@pytest.mark.slow
def test_serve_command_serves_on_loopback_and_stops_cleanly_on_sigterm(phantom_weights, tmp_path):
    token = secrets.token_hex(16)
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        _command("serve", "--port", str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(RAY_APP_API_TOKEN=token, RAY_APP_DOWNLOAD_WEIGHTS="false"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert f"serving on http://127.0.0.1:{port} (API docs at /docs)" in (tmp_path / "serve.log").read_text()
        body = gzip.compress(_small_phantom(tmp_path / "p.nii").read_bytes(), compresslevel=1)
        r = httpx.post(
            f"{url}/v1/segment",
            content=body,
            params={"scan_id": "via-command"},
            timeout=300,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/gzip"},
        )
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text[:500]
        assert httpx.post(f"{url}/v1/segment", content=body, timeout=60).status_code == 401
        assert httpx.get(f"{url}/docs", timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            stop_process(proc, timeout=10)
            code = None
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
