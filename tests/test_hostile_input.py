"""Hostile and broken input through the whole system, not just the readers: one batch manifest on S3 + DynamoDB
(moto server) that holds every kind of bad scan and bad row next to good scans, and the same scans and requests
sent to the Serve endpoint over HTTP.

The property: each kind ends as its own error code (a failure record, a rejected summary row, or a 4xx JSON
answer), the good scans beside them still succeed, no mask or other partial result is left for a bad one, keys
stay inside the output prefix, and nothing is fetched from a URI outside S3. The README's "Hostile input" table
lists the same kinds.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import socket
import threading
import uuid

import boto3
import nibabel as nib
import numpy as np
import pytest

from ray_app.adapters import cli
from ray_app.demo.phantom import make_phantom
from ray_app.storage.sinks import create_table, open_passport_store, read_summary
from tests import _scan_factory as f
from tests._service import running_service

pytestmark = pytest.mark.slow

MODEL = "total_fast"
TOKEN = "hostile-input-test-token-0123456789"
MAX_BODY = 16 * 1024**2


# ------------------------------------------------------------------------------------------------- inputs


def _phantom(seed: int) -> nib.Nifti1Image:
    """A 3 mm abdominal crop that fits one network tile: a few seconds per scan."""
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-142.5, -118.5, -133.5)
    ct = make_phantom(seed, affine=affine, shape=(96, 80, 80))[0]
    return nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), ct.affine)


def _with_datatype(raw: bytes, *, code: int, bitpix: int) -> bytes:
    out = bytearray(raw)
    out[70:72] = np.int16(code).tobytes()
    out[72:74] = np.int16(bitpix).tobytes()
    return bytes(out)


def _series(mutate=None, n: int = 8) -> list[bytes]:
    """The first ``n`` slices of the real JPEG 2000 series, optionally changed (headers only)."""
    datasets = f.dicom_datasets()[:n]
    if mutate:
        datasets = mutate(datasets) or datasets
    return f.dicom_bytes(datasets)


def _set(keyword, value, which=slice(None)):
    def mutate(datasets):
        for ds in datasets[which]:
            setattr(ds, keyword, value)

    return mutate


def _mixed(datasets):
    for i, ds in enumerate(datasets):
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.10" if i < 4 else "1.2.826.0.1.3680043.8.498.11"


def _zip_series(blobs: list[bytes]) -> bytes:
    return f.zip_bytes({f"series/IM{i:04d}.dcm": b for i, b in enumerate(blobs)})


def scan_kinds() -> dict[str, tuple[bytes | dict[str, bytes], str]]:
    """kind -> (content, expected error code). Bytes are one object / one request body; a dict is a DICOM
    series stored as separate objects under a prefix (sent to Serve as an S3 URI)."""
    ct = f.ct_like()
    good_gz = f.CT_SM.read_bytes()
    blobs = _series()
    singular = np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return {
        "empty-file": (b"", "empty_file"),
        "not-an-image": (b"this is a text file, not a scan\n" * 40, "unreadable_scan"),
        "truncated-gzip": (good_gz[: len(good_gz) // 2], "truncated_file"),
        "truncated-nifti": (gzip.decompress(good_gz)[:100_000], "truncated_file"),
        "corrupt-gzip": (good_gz[:100] + b"\x00" * 5000, "unreadable_scan"),
        "header-1e12-voxels": (
            f.crafted_header_bytes((10_000, 10_000, 10_000), payload=b"\0" * 1000),
            "too_many_voxels",
        ),
        "gzip-bomb": (f.crafted_header_bytes((8, 8, 8), payload=b"\0" * (64 * 1024**2)), "decompression_bomb"),
        "zip-bomb": (f.zip_bytes({"series/a.dcm": b"\0" * (32 * 1024**2)}), "decompression_bomb"),
        "zip-parent-path": (
            f.zip_bytes({"series/1.dcm": blobs[0], "../../etc/cron.d/evil.dcm": blobs[1]}),
            "unsafe_archive_path",
        ),
        "zip-absolute-path": (
            f.zip_bytes({"series/1.dcm": blobs[0], "/etc/evil.dcm": blobs[1]}),
            "unsafe_archive_path",
        ),
        "zip-truncated": (_zip_series(blobs)[: len(_zip_series(blobs)) // 2], "unreadable_scan"),
        "zip-without-dicom": (f.zip_bytes({"notes.txt": b"not dicom"}), "unreadable_scan"),
        "dicom-missing-slice": (_zip_series(_series(lambda d: d[:4] + d[5:])), "missing_slices"),
        "dicom-duplicate-slice": (_zip_series(_series(lambda d: d + [d[3]])), "duplicate_slices"),
        "dicom-mixed-series": (_zip_series(_series(_mixed)), "mixed_series"),
        "dicom-single-image": (_zip_series(blobs[:1]), "not_3d"),
        "dicom-mr": (_zip_series(_series(_set("Modality", "MR"))), "not_ct"),
        "dicom-pet": (_zip_series(_series(_set("Modality", "PT"))), "not_ct"),
        "dicom-prefix-missing-slices": (
            {f"IM{i:04d}.dcm": b for i, b in enumerate(blobs) if i not in (2, 5)},
            "missing_slices",
        ),
        "image-2d": (f.nifti_bytes(np.zeros((32, 32), np.int16)), "not_3d"),
        "image-4d": (f.nifti_bytes(np.zeros((8, 8, 8, 2), np.int16)), "not_3d"),
        "complex-voxels": (f.nifti_bytes(np.zeros((8, 8, 8), np.complex64)), "unsupported_dtype"),
        "bool-voxels": (
            _with_datatype(f.nifti_bytes(np.zeros((8, 8, 8), np.uint8), gz=False), code=1, bitpix=1),
            "unsupported_dtype",
        ),
        "rgb-voxels": (
            f.nifti_bytes(np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])),
            "unsupported_dtype",
        ),
        "nan-voxels": (f.nifti_bytes(np.where(ct > 0, np.nan, ct).astype(np.float32)), "non_finite_voxels"),
        "inf-voxels": (f.nifti_bytes(np.where(ct > 0, np.inf, ct).astype(np.float32)), "non_finite_voxels"),
        "zero-spacing": (f.nifti_bytes(ct, zooms=(1.0, 0.0, 1.0)), "invalid_spacing"),
        "negative-spacing": (f.nifti_bytes(ct, zooms=(1.0, 1.0, -1.0)), "invalid_spacing"),
        "singular-affine": (f.nifti_bytes(ct, affine=singular), "invalid_affine"),
        "mr-intensities": (
            f.nifti_bytes(np.random.default_rng(0).uniform(0, 800, (16, 16, 16)).astype(np.float32)),
            "not_hounsfield",
        ),
    }


GOOD = ("good-gz", "good-plain")


@pytest.fixture(scope="module")
def kinds() -> dict[str, tuple[bytes | dict[str, bytes], str]]:
    return scan_kinds()


@pytest.fixture(scope="module")
def good_scans() -> dict[str, bytes]:
    return {"good-gz": gzip.compress(_phantom(7).to_bytes(), compresslevel=1), "good-plain": _phantom(8).to_bytes()}


class Listener:
    """A TCP listener on loopback that counts connections: proof that an ``http://`` URI is never fetched."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def listener():
    lst = Listener()
    yield lst
    lst.close()


# ------------------------------------------------------------------------------------------------- batch


def _manifest(bucket: str, kinds: dict, listener_port: int) -> tuple[bytes, dict[int, tuple[str, str]]]:
    """The CSV bytes (one line is deliberately not UTF-8) and, per rejected row number, (label, expected code)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["scan_id", "uri"])
    rows: list[list[str] | bytes] = []
    for sid in GOOD:
        rows.append([sid, f"s3://{bucket}/in/{sid}.nii.gz" if sid == "good-gz" else f"s3://{bucket}/in/{sid}.nii"])
    for kind, (content, _) in kinds.items():
        rows.append([kind, f"s3://{bucket}/in/{kind}/" if isinstance(content, dict) else f"s3://{bucket}/in/{kind}"])
    rows += [
        ["missing-object", f"s3://{bucket}/in/no-such-scan.nii.gz"],
        ["other-bucket", f"s3://{bucket}-elsewhere/in/good-gz.nii.gz"],
    ]
    rejected = {
        "duplicate id": (["good-gz", f"s3://{bucket}/in/zero-spacing"], "duplicate_scan_id"),
        "uri missing": (["no-uri", ""], "missing_field"),
        "scan_id missing": (["", f"s3://{bucket}/in/good-gz.nii.gz"], "missing_field"),
        "extra column": (["extra", f"s3://{bucket}/in/good-gz.nii.gz", "surprise"], "malformed_row"),
        "blank line": ([], "empty_row"),
        "not UTF-8": (b"caf\xe9-scan,s3://" + bucket.encode() + b"/in/good-gz.nii.gz", "not_utf8"),
        "formula =": (
            ['=HYPERLINK("http://evil.example/x","open")', f"s3://{bucket}/in/good-gz.nii.gz"],
            "formula_injection",
        ),
        "formula @": (["@SUM(A1:A9)", f"s3://{bucket}/in/good-gz.nii.gz"], "formula_injection"),
        "formula +": (["+cmd|' /C calc'!A0", f"s3://{bucket}/in/good-gz.nii.gz"], "formula_injection"),
        "formula - in uri": (["formula-uri", "-2+3+cmd|' /C calc'!A0"], "formula_injection"),
        "id with /": (["a/b", f"s3://{bucket}/in/good-gz.nii.gz"], "invalid_scan_id"),
        "id ../": (["../../escape", f"s3://{bucket}/in/good-gz.nii.gz"], "invalid_scan_id"),
        "id ..": (["x..y", f"s3://{bucket}/in/good-gz.nii.gz"], "invalid_scan_id"),
        "id with BEL": (["bell\x07id", f"s3://{bucket}/in/good-gz.nii.gz"], "invalid_scan_id"),
        "id with newline": (["line\nbreak", f"s3://{bucket}/in/good-gz.nii.gz"], "invalid_scan_id"),
        "id with ESC": (["esc\x1b[31mred", f"s3://{bucket}/in/good-gz.nii.gz"], "invalid_scan_id"),
        "id too long": (["x" * 129, f"s3://{bucket}/in/good-gz.nii.gz"], "invalid_scan_id"),
        "http:// uri": (["http-uri", f"http://127.0.0.1:{listener_port}/scan.nii.gz"], "invalid_uri"),
        "file:// uri": (["file-uri", "file:///etc/passwd"], "invalid_uri"),
        "gs:// uri": (["gs-uri", "gs://some-bucket/scan.nii.gz"], "invalid_uri"),
        "uri with control char": (["ctl-uri", f"s3://{bucket}/in/good-gz.nii.gz\x01"], "invalid_uri"),
        "bad bucket name": (["bad-bucket", "s3://Not_A_Bucket/x.nii.gz"], "invalid_uri"),
    }
    first = len(rows) + 1
    expected: dict[int, tuple[str, str]] = {}
    for number, (label, (row, code)) in enumerate(rejected.items(), start=first):
        rows.append(row)
        expected[number] = (label, code)
    out = bytearray(buf.getvalue().encode())
    for row in rows:
        if isinstance(row, bytes):
            out += row + b"\n"
        elif not row:
            out += b"\n"
        else:
            line = io.StringIO(newline="")
            csv.writer(line, lineterminator="\n").writerow(row)
            out += line.getvalue().encode()
    return bytes(out), expected


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def batch_job(moto_server, ray_cluster, kinds, good_scans, listener):
    """Upload everything, run ``ray-app batch`` once over the one manifest, return what it left behind."""
    s3 = boto3.client("s3")
    bucket = f"hostile-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    table = f"passports-{uuid.uuid4().hex[:10]}"
    create_table(table)
    s3.put_object(Bucket=bucket, Key="in/good-gz.nii.gz", Body=good_scans["good-gz"])
    s3.put_object(Bucket=bucket, Key="in/good-plain.nii", Body=good_scans["good-plain"])
    for kind, (content, _) in kinds.items():
        if isinstance(content, dict):
            for name, blob in content.items():
                s3.put_object(Bucket=bucket, Key=f"in/{kind}/{name}", Body=blob)
        else:
            s3.put_object(Bucket=bucket, Key=f"in/{kind}", Body=content)
    manifest, rejected = _manifest(bucket, kinds, listener.port)
    s3.put_object(Bucket=bucket, Key="in/manifest.csv", Body=manifest)
    code = cli.main(
        [
            "batch",
            "--manifest",
            f"s3://{bucket}/in/manifest.csv",
            "--output",
            f"s3://{bucket}/out",
            "--table",
            table,
            "--job-id",
            "hostile-1",
            "--max-actors",
            "1",
        ]
    )
    summary = read_summary(f"s3://{bucket}/out/_jobs/hostile-1/summary.parquet")
    yield {
        "s3": s3,
        "bucket": bucket,
        "store": open_passport_store(f"dynamodb://{table}"),
        "exit_code": code,
        "summary": summary,
        "rejected": rejected,
    }
    boto3.client("dynamodb").delete_table(TableName=table)


def test_every_bad_scan_gets_its_own_failure_record_and_no_mask(batch_job, kinds):
    s3, bucket, store = batch_job["s3"], batch_job["bucket"], batch_job["store"]
    assert batch_job["exit_code"] == 1
    expected = {kind: code for kind, (_, code) in kinds.items()}
    expected |= {"missing-object": "object_not_found", "other-bucket": "object_not_found"}
    assert len(expected) >= 25
    rows = {r["scan_id"]: r for r in batch_job["summary"] if r["status"] != "rejected"}
    got = {kind: (store.get(kind, MODEL) or {}).get("error", {}).get("code") for kind in expected}
    assert got == expected
    assert {kind: rows[kind]["error_code"] for kind in expected} == expected
    keys = _keys(s3, bucket, "out/")
    for kind in expected:
        assert [k for k in keys if k.startswith(f"out/{kind}/")] == [f"out/{kind}/{MODEL}/passport.json"], kind
        doc = store.get(kind, MODEL)
        assert doc["status"] == "failed" and not doc.get("structures") and "outputs" not in doc, doc


def test_good_scans_in_the_same_manifest_still_succeed(batch_job):
    s3, bucket, store = batch_job["s3"], batch_job["bucket"], batch_job["store"]
    for sid in GOOD:
        doc = store.get(sid, MODEL)
        assert doc["status"] == "ok" and doc["structures"]["liver"]["present"], sid
        mask = s3.get_object(Bucket=bucket, Key=f"out/{sid}/{MODEL}/mask.nii.gz")["Body"].read()
        assert nib.Nifti1Image.from_bytes(gzip.decompress(mask)).shape == tuple(doc["scan"]["shape"])
    statuses = [r["status"] for r in batch_job["summary"] if r["scan_id"] in GOOD]
    assert statuses.count("ok") == len(GOOD), "one ok row per good scan, plus the rejected duplicate row"


def test_every_bad_manifest_row_is_rejected_with_its_code_and_never_runs(batch_job):
    by_row = {}
    for r in batch_job["summary"]:
        if r["status"] == "rejected":
            by_row[int(re.match(r"manifest row (\d+):", r["error"]).group(1))] = r["error_code"]
    assert by_row == {number: code for number, (_, code) in batch_job["rejected"].items()}
    recorded = {d["scan_id"] for d in batch_job["store"].list_by_job("hostile-1")}
    for r in batch_job["summary"]:
        if r["status"] == "rejected" and r["scan_id"] not in GOOD:
            assert r["scan_id"] not in recorded
    for r in batch_job["summary"]:  # a spreadsheet opening the summary as CSV evaluates no cell
        for value in r.values():
            assert not (isinstance(value, str) and value[:1] in "=+-@\t\r"), value


def test_keys_stay_inside_the_output_prefix_and_no_uri_outside_s3_is_fetched(batch_job, listener):
    keys = _keys(batch_job["s3"], batch_job["bucket"])
    assert all(k.startswith(("in/", "out/")) for k in keys)
    layout = re.compile(rf"out/([A-Za-z0-9][A-Za-z0-9._-]*)/{MODEL}/(mask\.nii\.gz|passport\.json)")
    for key in (k for k in keys if k.startswith("out/") and not k.startswith("out/_jobs/")):
        match = layout.fullmatch(key)
        assert match and ".." not in match.group(1), key
    job_keys = sorted(k for k in keys if k.startswith("out/_jobs/"))
    assert job_keys[0] == "out/_jobs/hostile-1/job.json" and len(job_keys) > 1
    part = re.compile(r"out/_jobs/hostile-1/summary\.parquet/(plan|run)-[0-9a-f]{24}\.parquet")
    assert all(part.fullmatch(k) for k in job_keys[1:]), job_keys
    assert listener.accepted == 0


def test_a_manifest_that_is_unusable_as_a_whole_stops_the_job_before_anything_runs(moto_server, tmp_path):
    from ray_app.adapters.batch import BatchConfig, run_batch
    from ray_app.storage.manifest import ManifestError

    s3 = boto3.client("s3")
    bucket = f"hostile-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    manifests = {
        "no-uri-column.csv": b"scan_id,path\na,s3://x/y\n",
        "no-columns.csv": b"",
        "bad-header.csv": b"scan_id,ur\xff\na,s3://x/y\n",
        "not-parquet.parquet": b"PAR1garbage",
        "manifest.txt": b"scan_id,uri\n",
    }
    for name, body in manifests.items():
        s3.put_object(Bucket=bucket, Key=f"in/{name}", Body=body)
        with pytest.raises(ManifestError) as info:
            run_batch(BatchConfig(manifest=f"s3://{bucket}/in/{name}", output=str(tmp_path / "out"), job_id="whole"))
        assert info.value.code == "invalid_manifest", name
    assert not (tmp_path / "out" / "_jobs").exists()


# ------------------------------------------------------------------------------------------------- Serve


@pytest.fixture(scope="module")
def service(ray_cluster, moto_server):
    s3 = boto3.client("s3")
    bucket = f"hostile-serve-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket=f"{bucket}-other")
    table = f"passports-{uuid.uuid4().hex[:10]}"
    create_table(table)
    settings = {
        "allowed_uri_prefixes": [f"s3://{bucket}/in/"],
        "max_body_bytes": MAX_BODY,
        "output_prefix": f"s3://{bucket}/out",
        "passport_store": f"dynamodb://{table}",
    }
    with running_service(TOKEN, settings) as client:
        yield {"client": client, "s3": s3, "bucket": bucket, "store": open_passport_store(f"dynamodb://{table}")}
    boto3.client("dynamodb").delete_table(TableName=table)


def _json_error(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()["error"]
    assert body["message"]
    return body["code"]


def _post(client, body: bytes, scan_id: str, content_type: str = "application/octet-stream"):
    return client.post(
        "/v1/segment",
        content=body,
        params={"scan_id": scan_id, "persist": "true"},
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type},
    )


def test_serve_answers_every_bad_scan_with_its_4xx_code_and_stores_nothing(service, kinds, good_scans):
    client, s3, bucket = service["client"], service["s3"], service["bucket"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    got, expected = {}, {}
    for kind, (content, code) in kinds.items():
        expected[kind] = code
        if isinstance(content, dict):
            for name, blob in content.items():
                s3.put_object(Bucket=bucket, Key=f"in/{kind}/{name}", Body=blob)
            r = client.post(
                "/v1/segment",
                params={"persist": "true"},
                headers=auth,
                json={"uri": f"s3://{bucket}/in/{kind}/", "scan_id": kind},
            )
        else:
            r = _post(client, content, kind)
        got[kind] = _json_error(r, 422)
        assert client.get("/healthz").status_code == 200
    assert got == expected
    r = client.post("/v1/segment", headers=auth, json={"uri": f"s3://{bucket}/in/absent.nii.gz"})
    assert _json_error(r, 422) == "object_not_found"
    assert _json_error(_post(client, b"\0" * (MAX_BODY + 1), "too-big"), 413) == "body_too_large"

    r = _post(client, good_scans["good-gz"], "after-hostile")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    keys = _keys(s3, bucket, "out/")
    assert keys and all(k.startswith("out/after-hostile/") for k in keys), keys
    assert all(service["store"].get(kind, MODEL) is None for kind in kinds)


def test_serve_refuses_uris_outside_the_allowed_buckets_without_fetching_them(service, good_scans, listener):
    client, s3, bucket = service["client"], service["s3"], service["bucket"]
    s3.put_object(Bucket=f"{bucket}-other", Key="in/good.nii.gz", Body=good_scans["good-gz"])
    s3.put_object(Bucket=bucket, Key="private/good.nii.gz", Body=good_scans["good-gz"])
    before = listener.accepted
    for uri in (
        f"http://127.0.0.1:{listener.port}/scan.nii.gz",
        f"https://127.0.0.1:{listener.port}/scan.nii.gz",
        "file:///etc/passwd",
        "/etc/passwd",
        f"s3://{bucket}-other/in/good.nii.gz",
        f"s3://{bucket}/private/good.nii.gz",
        f"s3://{bucket}/in/../private/good.nii.gz",
        "gs://bucket/scan.nii.gz",
        "http://169.254.169.254/latest/meta-data/",
    ):
        r = client.post("/v1/segment", headers={"Authorization": f"Bearer {TOKEN}"}, json={"uri": uri})
        assert _json_error(r, 403) == "uri_not_allowed", uri
    assert listener.accepted == before


@pytest.mark.parametrize(
    "scan_id",
    ["a/b", "../../etc", "..", "x..y", "bell\x07", "tab\tid", "=HYPERLINK(1)", "@SUM(A1)", "x" * 129, "", "-dash"],
)
def test_serve_refuses_unsafe_scan_ids(service, good_scans, scan_id):
    r = _post(service["client"], good_scans["good-gz"], scan_id)
    assert _json_error(r, 422) == "invalid_id"
