"""URI I/O against a real moto S3 server and the local filesystem, and the safe key layout."""

from __future__ import annotations

import os

import boto3
import pytest

from ray_app import storage
from ray_app.storage.keys import InvalidId, result_uri, validate_scan_id


def test_s3_round_trip_encrypts_every_put(s3_bucket):
    s3 = boto3.client("s3")
    uris = [f"s3://{s3_bucket}/out/a.bin", f"s3://{s3_bucket}/out/sub/b.json", f"s3://{s3_bucket}/other.txt"]
    for i, uri in enumerate(uris):
        assert storage.write_bytes(uri, b"payload %d" % i, content_type="application/json") == uri

    for i, uri in enumerate(uris):
        assert storage.read_bytes(uri) == b"payload %d" % i
        head = s3.head_object(Bucket=s3_bucket, Key=uri.split("/", 3)[3])
        assert head["ServerSideEncryption"] == "AES256"
        assert head["ContentType"] == "application/json"

    assert storage.list_uris(f"s3://{s3_bucket}/out/") == uris[:2]
    assert storage.list_uris(f"s3://{s3_bucket}") == sorted(uris)
    assert storage.exists(uris[0])
    storage.delete(uris[0])
    storage.delete(uris[0])  # already gone: still fine
    assert not storage.exists(uris[0])


def test_client_uses_botocore_retry_mode(moto_server):
    retries = storage.client("s3").meta.config.retries
    assert retries["mode"] == "standard" and retries["total_max_attempts"] >= 3


def test_oversized_s3_object_refused_before_download(s3_bucket):
    uri = f"s3://{s3_bucket}/big.nii.gz"
    storage.write_bytes(uri, b"x" * 1000)
    calls: list[str] = []

    def record(model, **_):
        calls.append(model.name)

    events = storage.client("s3").meta.events
    events.register("before-call.s3", record, unique_id="test-record-calls")
    try:
        with pytest.raises(storage.ObjectTooLarge) as excinfo:
            storage.read_bytes(uri, max_bytes=999)
    finally:
        events.unregister("before-call.s3", unique_id="test-record-calls")
    assert excinfo.value.code == "object_too_large"
    assert "1000 bytes" in str(excinfo.value)
    assert calls == ["HeadObject"]
    assert storage.read_bytes(uri, max_bytes=1000) == b"x" * 1000


def test_oversized_local_file_refused(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 10)
    with pytest.raises(storage.ObjectTooLarge):
        storage.read_bytes(str(path), max_bytes=9)
    assert storage.read_bytes(str(path), max_bytes=10) == b"x" * 10


def test_missing_objects_give_clear_errors(s3_bucket, tmp_path):
    for uri in (f"s3://{s3_bucket}/nope.nii.gz", "s3://no-such-bucket-here/x", str(tmp_path / "nope.nii.gz")):
        with pytest.raises(storage.ObjectNotFound) as excinfo:
            storage.read_bytes(uri)
        assert excinfo.value.code == "object_not_found"
        assert uri in str(excinfo.value)
        assert not storage.exists(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com/scan.nii.gz",
        "https://example.com/scan.nii.gz",
        "file:///etc/passwd",
        "gs://bucket/key",
        "ftp://host/x",
        "s3:/bucket/key",
        "s3://Bad_Bucket/key",
        "s3://bucket/prefix/",
        "",
        "scan\n.nii.gz",
    ],
)
def test_unsupported_uris_refused(uri):
    for call in (storage.read_bytes, storage.exists, storage.delete, lambda u: storage.write_bytes(u, b"x")):
        with pytest.raises(storage.UnsupportedUri) as excinfo:
            call(uri)
        assert excinfo.value.code == "unsupported_uri"


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "dir" / "mask.nii.gz"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"

    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # fails mid-write
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["mask.nii.gz"]


def test_local_listing_works_like_s3_prefixes(tmp_path):
    for rel in ("out/s1/m/a", "out/s1/m/b", "out/s10/m/a", "other/x"):
        storage.write_bytes(str(tmp_path / rel), b"")
    # A directory lists the files below it only (not out/s10), any other path is a prefix like on S3.
    assert storage.list_uris(str(tmp_path / "out/s1")) == [str(tmp_path / "out/s1/m/a"), str(tmp_path / "out/s1/m/b")]
    assert storage.list_uris(str(tmp_path / "out/s")) == [
        str(tmp_path / p) for p in ("out/s1/m/a", "out/s1/m/b", "out/s10/m/a")
    ]
    assert storage.list_uris(str(tmp_path / "missing")) == []


HOSTILE_IDS = [
    "../x",
    "..",
    ".",
    "a/b",
    "/abs",
    "a\\b",
    "a..b",
    "a\x00b",
    "a\nb",
    "tab\t",
    "",
    " ",
    "x" * 129,
    '=HYPERLINK("http://evil")',
    "+1",
    "-rf",
    "@SUM(A1)",
    ".hidden",
    "é",
    None,
    42,
]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_hostile_ids_refused_everywhere_in_the_key(bad):
    with pytest.raises(InvalidId):
        validate_scan_id(bad)
    for args in ((bad, "total_fast", "mask.nii.gz"), ("s1", bad, "mask.nii.gz"), ("s1", "total_fast", bad)):
        with pytest.raises(InvalidId) as excinfo:
            result_uri("s3://bucket/results", *args)
        assert excinfo.value.code == "invalid_id"


@pytest.mark.parametrize("prefix", ["s3://bucket/results", "s3://bucket/results/", "s3://bucket", "/data/out", "out"])
def test_result_uri_layout_stays_inside_prefix(prefix):
    uri = result_uri(prefix, "CT_0001.a-b", "total_fast", "mask.nii.gz")
    base = prefix.rstrip("/")
    assert uri == f"{base}/CT_0001.a-b/total_fast/mask.nii.gz"
    if not base.startswith("s3://"):
        assert os.path.commonpath([os.path.abspath(base), os.path.abspath(uri)]) == os.path.abspath(base)


def test_result_uri_refuses_bad_prefixes():
    with pytest.raises(storage.UnsupportedUri):
        result_uri("https://host/out", "s1", "total_fast", "mask.nii.gz")
    with pytest.raises(InvalidId):
        result_uri("/", "s1", "total_fast", "mask.nii.gz")


def test_an_endpoint_that_does_not_answer_is_a_clear_error_not_a_traceback(moto_server, monkeypatch, tmp_path, capsys):
    """No answer at all (a wrong endpoint, no network): every S3 and DynamoDB call turns botocore's connection
    error into a StorageError naming what it tried, and ``ray-app batch`` exits 2 with that one line."""
    from ray_app.adapters import cli
    from ray_app.ops.cluster import free_port
    from ray_app.storage.sinks import open_passport_store

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    storage.clear_client_cache()
    try:
        uri = "s3://scans/in/ct.nii.gz"
        calls = {
            "read": lambda: storage.read_bytes(uri),
            "check": lambda: storage.exists(uri),
            "write": lambda: storage.write_bytes(uri, b"x"),
            "list": lambda: storage.list_uris("s3://scans/in/"),
            "delete": lambda: storage.delete(uri),
            "passport": lambda: open_passport_store("dynamodb://passports").get("ct", "total_fast"),
        }
        for what, call in calls.items():
            with pytest.raises(storage.StorageError) as err:
                call()
            assert "Could not connect to the endpoint URL" in str(err.value), what
            assert ("scans/in" if what != "passport" else "'passports'") in str(err.value), what

        manifest = "s3://scans/manifest.csv"
        assert cli.main(["batch", "--manifest", manifest, "--output", str(tmp_path / "out")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: invalid_manifest: cannot read manifest {manifest}: ") and "connect" in line
    finally:
        storage.clear_client_cache()
