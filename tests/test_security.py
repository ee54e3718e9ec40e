"""Security properties of the running system: every ``/v1`` route needs the bearer token and compares it in
constant time, the token never reaches a log, patient identifiers from DICOM headers reach no output, key, log
or error message (batch and Serve), segmentation opens no network connection, and every S3 write requests
server-side encryption."""

from __future__ import annotations

import gzip
import hmac
import io
import json
import secrets
import sys
import threading
import uuid
import zipfile
from types import SimpleNamespace

import boto3
import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_app.adapters import cli
from ray_app.demo.phantom import make_phantom
from ray_app.settings import Settings
from ray_app.storage.sinks import create_table, open_passport_store
from tests import _scan_factory as f
from tests._service import log_hits, running_service
from tests.guards import audit

pytestmark = pytest.mark.slow

MODEL = "total_fast"
TOKEN = secrets.token_urlsafe(24)
#: Wrong tokens, each unique to this run so a log search can find it: other lengths, one character off, non-ASCII.
WRONG = [
    secrets.token_hex(1),
    secrets.token_hex(8),
    TOKEN[:-1],
    TOKEN[:-1] + ("A" if TOKEN[-1] != "A" else "B"),
    TOKEN + "x",
    secrets.token_hex(2048),
]
NON_ASCII = "\xe9" * 20 + secrets.token_hex(8)

#: Identifiers put into the DICOM headers of a copy of the example series; each needle must appear nowhere.
PHI = {
    "PatientName": "ZZPHILEAK^JANE^QUINCY",
    "PatientID": "PHI-55501777",
    "PatientBirthDate": "19010203",
    "OtherPatientIDs": "PHI-ALT-886644",
    "PatientAddress": "17 Phileakstreet",
    "PatientTelephoneNumbers": "555-0199-8473621",
    "AccessionNumber": "ACCPHI4242",
    "InstitutionName": "Phileak General Hospital",
    "ReferringPhysicianName": "DR^PHIREFERRER",
}
NEEDLES = [
    "ZZPHILEAK",
    "QUINCY",
    "55501777",
    "19010203",
    "1901-02-03",
    "ALT-886644",
    "Phileak",
    "0199-8473621",
    "ACCPHI4242",
    "PHIREFERRER",
]


def _identified_series(mutate=None) -> bytes:
    """The real series (with the UIDs a DICOM-SEG needs) carrying known identifiers, zipped."""
    datasets = f.with_uids(f.dicom_datasets())
    for ds in datasets:
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
    if mutate:
        datasets = mutate(datasets) or datasets
    return f.zip_bytes({f"series/IM{i:04d}.dcm": b for i, b in enumerate(f.dicom_bytes(datasets))})


def _mr(datasets):
    for ds in datasets:
        ds.Modality = "MR"


def _truncated(blobs_zip: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(blobs_zip)) as z:
        members = {name: z.read(name) for name in z.namelist()}
    name = sorted(members)[3]
    members[name] = members[name][:3000]
    return f.zip_bytes(members)


@pytest.fixture(scope="module")
def identified() -> dict[str, bytes]:
    good = _identified_series()
    return {
        "phi-good": good,
        "phi-mr": _identified_series(_mr),
        "phi-missing": _identified_series(lambda d: d[:7] + d[8:]),
        "phi-truncated": _truncated(good),
    }


def _phi_in(data: bytes | str) -> list[str]:
    data = data.encode() if isinstance(data, str) else data
    return [n for n in NEEDLES if n.encode() in data]


def _objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


# ------------------------------------------------------------------------------------------------- batch


@pytest.fixture(scope="module")
def batch_run(moto_server, ray_cluster, identified):
    s3 = boto3.client("s3")
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    table = f"passports-{uuid.uuid4().hex[:10]}"
    create_table(table)
    lines = ["scan_id,uri"]
    for sid, body in identified.items():
        s3.put_object(Bucket=bucket, Key=f"in/{sid}.zip", Body=body)
        lines.append(f"{sid},s3://{bucket}/in/{sid}.zip")
    s3.put_object(Bucket=bucket, Key="in/manifest.csv", Body="\n".join(lines).encode())
    out = io.StringIO()
    saved, sys.stdout = sys.stdout, out  # the CLI's own report, as a user sees it
    try:
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
                "phi-1",
                "--max-actors",
                "1",
            ]
        )
    finally:
        sys.stdout = saved
    yield {
        "s3": s3,
        "bucket": bucket,
        "table": table,
        "exit_code": code,
        "report": out.getvalue(),
        "store": open_passport_store(f"dynamodb://{table}"),
    }
    boto3.client("dynamodb").delete_table(TableName=table)


def test_batch_outputs_keys_records_and_report_carry_no_patient_identifiers(batch_run):
    s3, bucket, store = batch_run["s3"], batch_run["bucket"], batch_run["store"]
    assert batch_run["exit_code"] == 1
    codes = {
        sid: store.get(sid, MODEL)["status"] if sid == "phi-good" else store.get(sid, MODEL)["error"]["code"]
        for sid in ("phi-good", "phi-mr", "phi-missing", "phi-truncated")
    }
    assert codes == {
        "phi-good": "ok",
        "phi-mr": "not_ct",
        "phi-missing": "missing_slices",
        "phi-truncated": "unreadable_scan",
    }
    objects = _objects(s3, bucket, "out/")
    assert f"out/phi-good/{MODEL}/mask.nii.gz" in objects and f"out/phi-good/{MODEL}/seg.dcm" in objects
    for key, body in objects.items():
        assert _phi_in(key) == [], key
        if key.endswith("seg.dcm"):
            continue  # a DICOM-SEG must name its patient to be filed with the study; it is stored encrypted
        if key.endswith(".nii.gz"):
            body = gzip.decompress(body)
        if key.endswith(".parquet"):
            body = str(pq.ParquetFile(io.BytesIO(body)).read().to_pylist()).encode()
        assert _phi_in(body) == [], key
    items = boto3.client("dynamodb").scan(TableName=batch_run["table"])["Items"]
    documents = [store.get(i["scan_id"]["S"], i["model_key"]["S"]) for i in items]  # decompressed if stored gzipped
    assert len(items) == 4 and _phi_in(repr(items)) == [] and _phi_in(json.dumps(documents)) == []
    assert _phi_in(batch_run["report"]) == [] and "phi-mr" in batch_run["report"]


def test_every_object_the_job_wrote_was_written_with_server_side_encryption(batch_run):
    s3, bucket = batch_run["s3"], batch_run["bucket"]
    keys = list(_objects(s3, bucket, "out/"))
    assert len(keys) >= 1 + 4 + 2  # summary, four passports, the good scan's mask and DICOM-SEG
    for key in keys:
        assert s3.head_object(Bucket=bucket, Key=key).get("ServerSideEncryption") == "AES256", key


# ------------------------------------------------------------------------------------------------- Serve


@pytest.fixture(scope="module")
def service(batch_run):
    """Started after the batch job (both need the session's two CPUs)."""
    bucket = batch_run["bucket"]
    settings = {
        "allowed_uri_prefixes": [f"s3://{bucket}/in/"],
        "output_prefix": f"s3://{bucket}/serve-out",
        "passport_store": f"dynamodb://{batch_run['table']}",
    }
    with running_service(TOKEN, settings) as client:
        yield {"client": client, **batch_run}


def _v1_routes(client) -> list[tuple[str, str]]:
    """The routes the running app serves (its OpenAPI document: Serve moves a class's routes into the replica)."""
    paths = client.get("/openapi.json").json()["paths"]
    return sorted((method.upper(), path) for path, ops in paths.items() if path.startswith("/v1") for method in ops)


def test_every_v1_route_refuses_a_missing_or_wrong_token_and_takes_the_right_one(service):
    client = service["client"]
    routes = _v1_routes(client)
    assert {("POST", "/v1/segment"), ("GET", "/v1/passports/{scan_id}")} <= set(routes)
    refused = [
        {},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {NON_ASCII}".encode("latin-1")},
        *({"Authorization": f"Bearer {w}"} for w in WRONG),
    ]
    for method, path in routes:
        url = path.replace("{scan_id}", "no-such-scan")
        for headers in refused:
            r = client.request(method, url, headers={**headers, "Content-Type": "application/gzip"}, content=b"x")
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
        r = client.request(
            method, url, headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/gzip"}, content=b"x"
        )
        assert r.status_code not in (401, 403, 500), (method, path, r.status_code, r.text[:200])


def test_the_token_comparison_is_hmac_compare_digest_on_bytes(monkeypatch):
    """Constant time: the check goes through ``hmac.compare_digest`` with bytes, whatever the length or characters
    of the offered token (a ``str`` comparison would raise on non-ASCII text, ``==`` would leak timing)."""
    from ray_app.adapters import serve as serve_app
    from ray_app.adapters.serve import ApiError

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    replica = SimpleNamespace(_token=TOKEN.encode())
    authorize = serve_app.SegmentService.func_or_class._authorize
    authorize(replica, SimpleNamespace(headers={"authorization": f"Bearer {TOKEN}"}))
    for given in (*WRONG, NON_ASCII):
        with pytest.raises(ApiError) as info:
            authorize(replica, SimpleNamespace(headers={"authorization": f"Bearer {given}"}))
        assert info.value.status == 401
    assert len(calls) == 1 + len(WRONG) + 1
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


def test_serve_answers_carry_no_patient_identifiers(service, identified):
    client, s3, bucket = service["client"], service["s3"], service["bucket"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post(
        "/v1/segment",
        content=identified["phi-good"],
        params={"scan_id": "phi-serve", "persist": "true"},
        headers={**auth, "Content-Type": "application/zip"},
    )
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text[:300]
    answers = [r]
    for sid, code in (("phi-mr", "not_ct"), ("phi-missing", "missing_slices"), ("phi-truncated", "unreadable_scan")):
        bad = client.post(
            "/v1/segment",
            content=identified[sid],
            params={"scan_id": f"{sid}-serve"},
            headers={**auth, "Content-Type": "application/zip"},
        )
        assert bad.status_code == 422 and bad.json()["error"]["code"] == code, bad.text[:300]
        answers.append(bad)
    s3.put_object(Bucket=bucket, Key="in/phi-uri.zip", Body=identified["phi-mr"])
    answers.append(client.post("/v1/segment", headers=auth, json={"uri": f"s3://{bucket}/in/phi-uri.zip"}))
    answers.append(client.get("/v1/passports/phi-serve", headers=auth))
    assert answers[-1].status_code == 200
    for answer in answers:
        assert _phi_in(answer.content) == [] and _phi_in(str(answer.headers)) == []
    for key, body in _objects(s3, bucket, "serve-out/").items():
        assert _phi_in(key) == []
        if not key.endswith("seg.dcm"):
            assert _phi_in(gzip.decompress(body) if key.endswith(".gz") else body) == [], key


def test_no_log_of_the_session_holds_a_token_or_a_patient_identifier(service):
    """Runs last in the module: every batch task, actor, Serve controller, proxy and replica has logged by now."""
    tokens = [t for t in (TOKEN, *WRONG) if len(t) >= 16] + [NON_ASCII[-16:]]
    hits = log_hits([*tokens, *NEEDLES, "phi-serve"])
    assert hits.pop("phi-serve"), "the search must see the replica's request log (it logs scan ids)"
    assert hits == {}, hits


# ------------------------------------------------------------------------------------------------- network


_net_events: list[tuple] = []
_net_recording = threading.Event()


def _net_hook(event: str, args: tuple) -> None:
    if _net_recording.is_set() and event in (
        "socket.getaddrinfo",
        "socket.connect",
        "socket.sendto",
        "urllib.Request",
        "http.client.connect",
    ):
        _net_events.append((event, args[:2]))


def test_segmentation_opens_no_network_connection_even_if_usage_statistics_were_on(phantom_weights):
    """TotalSegmentator POSTs usage statistics unless its config says not to: with the flag switched back on,
    building a segmenter and segmenting a scan resolves no host and opens no socket (loopback included)."""
    from totalsegmentator.config import get_totalseg_dir

    from ray_app.core import pipeline
    from ray_app.core.scan import scan_from_image
    from ray_app.core.segmenter import Segmenter

    config = get_totalseg_dir() / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "send_usage_stats": True}))
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-96.0, -96.0, -72.0)
    ct = make_phantom(5, affine=affine, shape=(64, 64, 48))[0]
    scan = scan_from_image(nib.Nifti1Image(np.asanyarray(ct.dataobj).astype(np.int16), ct.affine), "net-1", Settings())
    sys.addaudithook(_net_hook)
    _net_recording.set()
    try:
        with audit() as events:
            result = pipeline.segment_scan(Segmenter(fast=True, num_threads=1, settings=Settings()), scan)
    finally:
        _net_recording.clear()
    assert result.ok
    assert events.connections() == [] and _net_events == []
    assert json.loads(config.read_text())["send_usage_stats"] is False
