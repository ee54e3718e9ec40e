"""The batch job end to end on a local Ray: S3 (moto server) manifest and scans in, masks in S3, passports in
DynamoDB, a Parquet summary; then resume, and the same job on the embedded default (local folder + SQLite)."""

from __future__ import annotations

import io
import json
import zipfile

import boto3
import nibabel as nib
import pytest

from ray_app.adapters import cli
from ray_app.adapters.batch import BatchConfig, run_batch
from ray_app.demo.phantom import make_phantom
from ray_app.storage.sinks import open_passport_store, read_summary

pytestmark = pytest.mark.slow

MODEL = "total_fast"
GOOD = ["phantom-a", "phantom-b", "phantom-lps", "example-sm", "dicom-zip", "example-ct", "dicom-prefix"]
BAD = {"corrupt": "truncated_file", "missing": "object_not_found"}


def _nifti_bytes(img: nib.Nifti1Image) -> bytes:
    return nib.Nifti1Image(img.get_fdata().astype("int16"), img.affine).to_bytes()


def _gz(img: nib.Nifti1Image) -> bytes:
    import gzip

    return gzip.compress(_nifti_bytes(img), compresslevel=1)


@pytest.fixture(scope="module")
def inputs(example_dir) -> dict[str, bytes]:
    """Six good scans (phantoms, real CTs, a real JPEG 2000 DICOM series as a zip) and a corrupt file."""
    import numpy as np

    lps = np.diag([-2.5, -2.5, 3.0, 1.0])
    lps[:3, 3] = [180.0, 140.0, -190.0]
    dicom_zip = io.BytesIO()
    with zipfile.ZipFile(dicom_zip, "w") as z:
        for f in sorted((example_dir / "example_ct_dicom").iterdir()):
            z.write(f, f"series/{f.name}")
    good = _gz(make_phantom(7)[0])
    return {
        "phantom-a.nii.gz": good,
        "phantom-b.nii.gz": _gz(make_phantom(8)[0]),
        "phantom-lps.nii.gz": _gz(make_phantom(9, affine=lps)[0]),
        "example-sm.nii.gz": (example_dir / "example_ct_sm.nii.gz").read_bytes(),
        "example-ct.nii.gz": (example_dir / "example_ct.nii.gz").read_bytes(),
        "dicom-zip.zip": dicom_zip.getvalue(),
        "corrupt.nii.gz": good[: len(good) // 3],
    }


def _file(scan_id: str) -> str:
    if scan_id == "dicom-prefix":
        return "series/"  # the DICOM series as one object per slice under a prefix, as PACS exports land in S3
    return f"{scan_id}.zip" if scan_id == "dicom-zip" else f"{scan_id}.nii.gz"


def _manifest_csv(prefix: str) -> bytes:
    lines = ["scan_id,uri"]
    for sid in GOOD + ["corrupt"]:
        lines.append(f"{sid},{prefix}/{_file(sid)}")
    lines.append(f"missing,{prefix}/no-such-scan.nii.gz")
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def s3_job(moto_server, ray_cluster, inputs, series_files):
    """Upload the scans and manifest, run the job through the CLI, return what it left behind."""
    import uuid

    s3 = boto3.client("s3")
    bucket = f"job-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    from ray_app.storage.sinks import create_table

    table = f"passports-{uuid.uuid4().hex[:10]}"
    create_table(table)
    for name, data in {**inputs, **series_files}.items():
        s3.put_object(Bucket=bucket, Key=f"in/{name}", Body=data)
    s3.put_object(Bucket=bucket, Key="in/manifest.csv", Body=_manifest_csv(f"s3://{bucket}/in"))
    argv = [
        "batch",
        "--manifest",
        f"s3://{bucket}/in/manifest.csv",
        "--output",
        f"s3://{bucket}/out",
        "--table",
        table,
        "--job-id",
        "job-1",
        "--max-actors",
        "1",
    ]
    code = cli.main(argv)
    return {"bucket": bucket, "table": table, "argv": argv, "exit_code": code, "s3": s3}


def _keys(s3, bucket: str, prefix: str = "out/") -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def series_files(example_dir) -> dict[str, bytes]:
    return {f"series/{f.name}": f.read_bytes() for f in sorted((example_dir / "example_ct_dicom").iterdir())}


def test_every_good_scan_has_mask_passport_and_summary_row_and_failures_are_recorded(s3_job):
    s3, bucket = s3_job["s3"], s3_job["bucket"]
    assert s3_job["exit_code"] == 1, "the exit code must say that scans failed"
    store = open_passport_store(f"dynamodb://{s3_job['table']}")
    for sid in GOOD:
        head = s3.head_object(Bucket=bucket, Key=f"out/{sid}/{MODEL}/mask.nii.gz")
        assert head["ServerSideEncryption"] == "AES256"
        mask = nib.Nifti1Image.from_bytes(
            __import__("gzip").decompress(
                s3.get_object(Bucket=bucket, Key=f"out/{sid}/{MODEL}/mask.nii.gz")["Body"].read()
            )
        )
        doc = store.get(sid, MODEL)
        assert doc["status"] == "ok" and doc["scan"]["shape"] == list(mask.shape)
        stored_json = json.loads(s3.get_object(Bucket=bucket, Key=f"out/{sid}/{MODEL}/passport.json")["Body"].read())
        assert stored_json["structures"] == doc["structures"]
    for sid, code in BAD.items():
        doc = store.get(sid, MODEL)
        assert doc["status"] == "failed" and doc["error"]["code"] == code, doc
        assert not any(k.startswith(f"out/{sid}/{MODEL}/mask") for k in _keys(s3, bucket))
    summary = read_summary(f"s3://{bucket}/out/_jobs/job-1/summary.parquet")
    by_id = {r["scan_id"]: r for r in summary}
    assert set(by_id) == set(GOOD) | set(BAD)
    assert all(by_id[s]["status"] == "ok" and by_id[s]["liver_ml"] is not None for s in GOOD)
    assert {s: by_id[s]["error_code"] for s in BAD} == BAD
    assert {d["scan_id"] for d in store.list_by_job("job-1")} == set(GOOD) | set(BAD)


def test_scans_are_finished_and_written_while_later_ones_are_still_segmented(s3_job):
    """The default shape (one actor with all of the 2 CPUs but the CPU stages' share) must not hold back the
    finishing stage: passports and masks are written as scans come out of the actor, not after the last one (a
    job stopped midway would otherwise lose every result it had computed)."""
    rows = read_summary(f"s3://{s3_job['bucket']}/out/_jobs/job-1/summary.parquet")
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["finished_at"])
    last = ok[-1]
    last_segmented_from = last["finished_at"].timestamp() - last["write_s"] - last["passport_s"] - last["segment_s"]
    before = [r["scan_id"] for r in ok[:-1] if r["finished_at"].timestamp() < last_segmented_from]
    assert len(before) >= len(ok) - 2, (before, [(r["scan_id"], str(r["finished_at"])) for r in ok])


def test_the_summary_counts_the_cores_the_actors_threads_use_not_its_reservation(s3_job):
    """The default actor reserves 1.8 of the 2 CPUs and runs 2 torch threads: the cost report prices its seconds
    with the summary's ``actor_cpus``, so that must be the threads' 2 cores."""
    store = open_passport_store(f"dynamodb://{s3_job['table']}")
    ok = [r for r in read_summary(f"s3://{s3_job['bucket']}/out/_jobs/job-1/summary.parquet") if r["status"] == "ok"]
    assert ok and {r["actor_cpus"] for r in ok} == {2.0}
    assert {store.get(r["scan_id"], MODEL)["model"]["torch_threads"] for r in ok} == {2}


def test_a_dicom_series_under_an_s3_prefix_gives_the_same_passport_as_its_zip(s3_job):
    store = open_passport_store(f"dynamodb://{s3_job['table']}")
    prefix, zipped = store.get("dicom-prefix", MODEL), store.get("dicom-zip", MODEL)
    assert prefix["status"] == "ok" and prefix["scan"]["dicom"] is True
    assert prefix["scan"]["source_uri"] == f"s3://{s3_job['bucket']}/in/series/"
    assert prefix["structures"] == zipped["structures"]
    for key in ("shape", "spacing_mm", "affine", "orientation"):
        assert prefix["scan"][key] == zipped["scan"][key], key


def test_rerun_writes_nothing_new_and_redoes_only_a_deleted_passport(s3_job):
    s3, bucket = s3_job["s3"], s3_job["bucket"]
    store = open_passport_store(f"dynamodb://{s3_job['table']}")
    before = _keys(s3, bucket)
    stamps = {sid: store.get(sid, MODEL)["created_at"] for sid in GOOD + list(BAD)}

    argv = [a if a != "job-1" else "job-2" for a in s3_job["argv"]]
    # Nothing runs, but two scans of the manifest still have only a failure: the exit code says so.
    assert cli.main(argv) == 1, "scans skipped with an earlier failure are still failed"
    rerun = {r["scan_id"]: r for r in read_summary(f"s3://{bucket}/out/_jobs/job-2/summary.parquet")}
    assert {r["status"] for r in rerun.values()} == {"skipped"}
    assert {sid: r["error_code"] for sid, r in rerun.items() if r["error_code"]} == BAD
    after = {k: v for k, v in _keys(s3, bucket).items() if not k.startswith("out/_jobs/")}
    assert after == {k: v for k, v in before.items() if not k.startswith("out/_jobs/")}
    assert {sid: store.get(sid, MODEL)["created_at"] for sid in stamps} == stamps

    store.delete("phantom-b", MODEL)
    argv3 = [a if a != "job-1" else "job-3" for a in s3_job["argv"]]
    assert cli.main(argv3) == 1
    redone = [d["scan_id"] for d in store.list_by_job("job-3")]
    assert redone == ["phantom-b"]
    assert {sid: store.get(sid, MODEL)["created_at"] for sid in stamps if sid != "phantom-b"} == {
        sid: t for sid, t in stamps.items() if sid != "phantom-b"
    }


def test_force_redoes_everything_and_retry_failed_only_the_failures(ray_cluster, inputs, tmp_path, capsys):
    """On the embedded default: the exit code is 0 only when every scan of the manifest has a good result."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("phantom-a.nii.gz", "corrupt.nii.gz"):
        (folder / name).write_bytes(inputs[name])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"scan_id,uri\nphantom-a,{folder / 'phantom-a.nii.gz'}\ncorrupt,{folder / 'corrupt.nii.gz'}\n")
    out = tmp_path / "out"
    store = open_passport_store(f"sqlite:///{out / 'passports.sqlite'}")

    def run(job: str, *options: str) -> int:
        return cli.main(
            [
                "batch",
                "--manifest",
                str(manifest),
                "--output",
                str(out),
                "--job-id",
                job,
                "--max-actors",
                "1",
                "--per-structure",
                *options,
            ]
        )

    def stamps() -> dict[str, str]:
        return {sid: store.get(sid, MODEL)["created_at"] for sid in ("phantom-a", "corrupt")}

    assert run("first") == 1
    first = stamps()
    assert (out / "phantom-a" / MODEL / "segmentations.zip").is_file()
    assert json.loads((out / "phantom-a" / MODEL / "passport.json").read_text())["outputs"]["segmentations"] == str(
        out / "phantom-a" / MODEL / "segmentations.zip"
    )
    capsys.readouterr()

    assert run("again") == 1  # nothing ran; corrupt is still failed
    assert stamps() == first
    report = capsys.readouterr().out
    assert "1 of them failed earlier (--retry-failed redoes those)" in report and "corrupt" in report

    fixed = folder / "fixed.nii.gz"
    fixed.write_bytes(inputs["phantom-b.nii.gz"])
    manifest.write_text(f"scan_id,uri\nphantom-a,{folder / 'phantom-a.nii.gz'}\ncorrupt,{fixed}\n")
    assert run("retry", "--retry-failed") == 0  # the failure redone (now with a good file), the good one kept
    retried = stamps()
    assert retried["phantom-a"] == first["phantom-a"] and retried["corrupt"] != first["corrupt"]
    assert store.get("corrupt", MODEL)["status"] == "ok"
    assert [d["scan_id"] for d in store.list_by_job("retry")] == ["corrupt"]

    assert run("forced", "--force") == 0
    forced = stamps()
    assert all(forced[sid] != retried[sid] for sid in forced)
    assert {d["scan_id"] for d in store.list_by_job("forced")} == {"phantom-a", "corrupt"}


def test_embedded_default_gives_the_same_passports(s3_job, inputs, series_files, tmp_path):
    folder = tmp_path / "in"
    (folder / "series").mkdir(parents=True)
    for name, data in {**inputs, **series_files}.items():
        (folder / name).write_bytes(data)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"scan_id": sid, "uri": str(folder / _file(sid))}) + "\n" for sid in GOOD))
    report = run_batch(
        BatchConfig(manifest=str(manifest), output=str(tmp_path / "out"), job_id="local-1", max_actors=1)
    )
    assert report.failed == 0 and report.succeeded == len(GOOD)
    local = open_passport_store(f"sqlite:///{tmp_path / 'out' / 'passports.sqlite'}")
    remote = open_passport_store(f"dynamodb://{s3_job['table']}")
    for sid in GOOD:
        assert (tmp_path / "out" / sid / MODEL / "mask.nii.gz").is_file()
        ours, theirs = local.get(sid, MODEL), remote.get(sid, MODEL)
        assert ours["structures"] == theirs["structures"]
        assert ours["model"]["checksum"] == theirs["model"]["checksum"]


def test_ray_job_submit_runs_the_batch_job_on_a_started_head(phantom_weights, example_dir, tmp_path):
    """``ray job submit --working-dir .`` to a ``ray start --head`` cluster, as on AWS, runs to completion."""
    import subprocess

    from tests._ray import RAY_BIN, ray_head
    from tests.conftest import REPO

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"scan_id,uri\nsubmitted,{example_dir / 'example_ct_sm.nii.gz'}\n")
    out = tmp_path / "out"
    with ray_head(num_cpus=2) as head:
        done = subprocess.run(
            [
                str(RAY_BIN / "ray"),
                "job",
                "submit",
                "--address",
                head["dashboard"],
                "--working-dir",
                str(REPO),
                "--",
                "python",
                "jobs/segment_batch.py",
                "--manifest",
                str(manifest),
                "--output",
                str(out),
                "--job-id",
                "submitted-1",
                "--max-actors",
                "1",
            ],
            env=head["env"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout and "1 ok, 0 failed" in done.stdout
    doc = open_passport_store(f"sqlite:///{out / 'passports.sqlite'}").get("submitted", MODEL)
    assert doc["status"] == "ok" and (out / "submitted" / MODEL / "mask.nii.gz").is_file()


def test_a_pilot_with_limit_runs_the_first_scans_prices_the_month_and_the_full_run_does_the_rest(
    ray_cluster, tmp_path, capsys
):
    from ray_app.ops import cost
    from tests._scan_factory import small_phantom

    ids = ["p-0", "p-1", "p-2"]
    lines = ["scan_id,uri"]
    for i, sid in enumerate(ids):
        (tmp_path / f"{sid}.nii.gz").write_bytes(small_phantom(600 + i))
        lines.append(f"{sid},{tmp_path / f'{sid}.nii.gz'}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    argv = ["batch", "--manifest", str(tmp_path / "m.csv"), "--output", str(tmp_path / "out"), "--max-actors", "1"]

    assert cli.main([*argv, "--job-id", "pilot", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    summary = str(tmp_path / "out" / "_jobs" / "pilot" / "summary.parquet")
    assert sorted(r["scan_id"] for r in read_summary(summary) if r["status"] == "ok") == ["p-0", "p-1"]
    measured = cost.measure([summary])
    month = cost.estimate(measured, cost.Assumptions(scans_per_month=10_000), cost.load_prices()).total("Spot CPU")
    assert f"measured: 2 scans, {measured.cpu_seconds_per_scan:.1f} CPU-s each" in out
    assert f"projected: 10,000 such scans a month on AWS, job-scoped with Spot CPU: about ${month:,.2f}" in out

    full = run_batch(
        BatchConfig(manifest=str(tmp_path / "m.csv"), output=str(tmp_path / "out"), job_id="full", max_actors=1)
    )
    assert [r["scan_id"] for r in full.rows if r["status"] == "ok"] == ["p-2"] and sorted(full.skipped) == ids[:2]
