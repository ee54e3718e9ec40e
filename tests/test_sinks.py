"""Artifact sink, both passport stores (same test bodies) and the Parquet job summary."""

from __future__ import annotations

import io
import json
import math
import os

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ray_app import storage
from ray_app.storage.keys import InvalidId
from ray_app.storage.sinks import (
    JOB_INDEX,
    SUMMARY_SCHEMA,
    ArtifactSink,
    DynamoDBPassportStore,
    InvalidPassport,
    clear_summary,
    create_table,
    dynamodb_item,
    index_item_bytes,
    item_bytes,
    open_passport_store,
    read_summary,
    write_summary,
)


def passport(scan_id="CT_001", model="total_fast", created_at="2026-11-27T10:00:00Z", status="ok", **extra):
    return {"scan_id": scan_id, "status": status, "created_at": created_at, "model": {"key": model}, **extra}


def big_passport(n_structures=117, note_chars=0, **kw):
    """Shaped like a real passport: per-structure volumes, HU statistics, bounding boxes, centroids."""
    structures = {
        f"structure_{i:03d}_{'left' if i % 2 else 'right'}": {
            "label": i + 1,
            "present": i % 7 != 0,
            "volume_ml": i * 10.123456789 + 0.1,
            "voxel_count": i * 1234,
            "hu": {"mean": 40.0 + i / 3, "std": 12.5 + i / 7, "p5": -10.25, "p50": 41.5, "p95": 88.125},
            "bbox_mm": [[i * 0.5, i * 1.25, i * 2.0], [i + 100.0, i + 150.5, i + 200.75]],
            "centroid_mm": [i / 3, i / 7, i / 11],
            "touches_border": i % 5 == 0,
            "components": i % 4,
            "note": "x" * note_chars if note_chars else None,
        }
        for i in range(n_structures)
    }
    scan = {"spacing_mm": [0.78125, 0.78125, 1.5], "shape": [512, 512, 300]}
    return passport(structures=structures, input=scan, **kw)


@pytest.fixture(params=["sqlite", "dynamodb"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return open_passport_store(f"sqlite:///{tmp_path}/passports.db")
    return open_passport_store(f"dynamodb://{request.getfixturevalue('dynamodb_table')}")


# --------------------------------------------------------------------------------------------- passports


def test_put_get_list_and_is_done(store):
    ok = passport("CT_001")
    failed = passport("CT_002", status="failed", error={"code": "invalid_scan", "message": "not CT"})
    other_job = passport("CT_003")
    assert store.put(ok, "job-1") and store.put(failed, "job-1") and store.put(other_job, "job-2")

    assert store.get("CT_001", "total_fast") == ok
    assert store.get("CT_001", "total") is None
    assert store.get("CT_999", "total_fast") is None
    assert store.list_by_job("job-1") == [ok, failed]
    assert store.list_by_job("job-2") == [other_job]
    assert store.list_by_job("job-3") == []
    assert store.is_done("CT_001", "total_fast")
    assert not store.is_done("CT_002", "total_fast")  # failed: must run again
    assert not store.is_done("CT_999", "total_fast")

    store.delete("CT_001", "total_fast")
    store.delete("CT_001", "total_fast")
    assert store.get("CT_001", "total_fast") is None
    assert not store.is_done("CT_001", "total_fast")


def test_older_passport_never_overwrites_newer(store):
    newer = passport(created_at="2026-11-27T11:00:00Z", run=2)
    older = passport(created_at="2026-11-27T12:30:00+02:00", run=1)  # 10:30 UTC: older despite the text
    newest = passport(created_at="2026-11-27T11:00:00.000001+00:00", run=3)

    assert store.put(newer, "job-2") is True
    assert store.put(older, "job-1") is False
    assert store.get("CT_001", "total_fast") == newer
    assert store.list_by_job("job-1") == []

    assert store.put(newest, "job-3") is True
    assert store.get("CT_001", "total_fast") == newest
    assert store.list_by_job("job-3") == [newest]
    assert store.list_by_job("job-2") == []  # the item moved to the job that last wrote it


def test_get_latest_over_models(store):
    fast = passport(model="total_fast", created_at="2026-11-27T10:00:00Z")
    full = passport(model="total", created_at="2026-11-27T11:00:00Z")
    assert store.get_latest("CT_001") is None
    store.put(full, "job")
    store.put(fast, "job")
    assert store.get_latest("CT_001") == full
    assert store.get_latest("CT_002") is None


def test_statuses_answers_many_scans_at_once_with_the_error_code_of_failures(store):
    """The resume check of a batch: more ids than one BatchGetItem takes, some stored, one under another model."""
    for i in range(0, 250, 2):
        store.put(passport(f"CT_{i:03d}"), "job-1")
    store.put(passport("CT_001", status="failed", error={"code": "truncated_file", "message": "cut"}), "job-1")
    store.put(passport("CT_003", model="total"), "job-1")
    found = store.statuses([f"CT_{i:03d}" for i in range(250)] + ["CT_000"], "total_fast")
    assert found == {**{f"CT_{i:03d}": ("ok", None) for i in range(0, 250, 2)}, "CT_001": ("failed", "truncated_file")}
    assert store.statuses([], "total_fast") == {}


NUMBERS = {
    "floats": [0.1, 1 / 3, 2.0, -0.5, -0.0, 1e-7, 123456.789, 1e-120],
    "ints": [0, -1, 7, 2**53 - 1],
    "nested": {"none": None, "true": True, "false": False, "text": "Überprüfung ✓", "empty": "", "list": []},
}


def test_numbers_round_trip_equal(store):
    original = passport(values=NUMBERS)
    assert store.put(original, "job")
    back = store.get("CT_001", "total_fast")
    assert back == original
    assert [type(v) for v in back["values"]["floats"] if v != int(v)] == [float] * 6
    assert back["values"]["nested"]["true"] is True and back["values"]["nested"]["none"] is None


def test_numbers_dynamodb_cannot_hold_survive(store):
    odd = {
        "nan": math.nan,
        "inf": -math.inf,
        "tiny": 1e-300,
        "big_float": 1e20,
        "big_int": 2**53 + 1,
        "huge_int": 10**40,
        "x": 1.5,
    }
    assert store.put(passport(values=odd), "job")
    back = store.get("CT_001", "total_fast")["values"]
    assert math.isnan(back.pop("nan"))
    assert back == {k: v for k, v in odd.items() if k != "nan"}
    assert type(back["big_float"]) is float and type(back["big_int"]) is int


def test_large_passports_fit(store):
    realistic = big_passport(scan_id="CT_117")
    assert store.put(realistic, "job")
    assert store.get("CT_117", "total_fast") == realistic

    huge = big_passport(scan_id="CT_HUGE", note_chars=4000)  # about 500 KB of JSON
    assert len(json.dumps(huge)) > 450_000
    assert store.put(huge, "job")
    assert store.get("CT_HUGE", "total_fast") == huge
    assert store.list_by_job("job") == [realistic, huge]
    assert store.is_done("CT_HUGE", "total_fast")


def test_dynamodb_item_forms(dynamodb_table):
    store = DynamoDBPassportStore(dynamodb_table)
    store.put(big_passport(scan_id="CT_117"), "job")
    store.put(big_passport(scan_id="CT_HUGE", note_chars=4000), "job")
    ddb = boto3.client("dynamodb")
    inline = ddb.get_item(TableName=dynamodb_table, Key={"scan_id": {"S": "CT_117"}, "model_key": {"S": "total_fast"}})
    packed = ddb.get_item(TableName=dynamodb_table, Key={"scan_id": {"S": "CT_HUGE"}, "model_key": {"S": "total_fast"}})
    assert "M" in inline["Item"]["passport"]  # readable map with Decimal numbers
    assert "passport_gz" in packed["Item"] and "passport" not in packed["Item"]
    assert len(packed["Item"]["passport_gz"]["B"]) < 400 * 1024
    store.put(passport(scan_id="CT_NUM", values=NUMBERS), "job")
    numbers = ddb.get_item(TableName=dynamodb_table, Key={"scan_id": {"S": "CT_NUM"}, "model_key": {"S": "total_fast"}})
    assert numbers["Item"]["passport"]["M"]["values"]["M"]["floats"]["L"][0] == {"N": "0.1"}
    create_table(dynamodb_table)  # idempotent


def _written(sink: ArtifactSink, doc: dict) -> str:
    """Write the passport as the batch job does (passport.json first); returns its URI."""
    return sink.put(doc["scan_id"], doc["model"]["key"], "passport.json", json.dumps(doc, indent=1).encode())


def test_dynamodb_keeps_a_compact_item_that_points_at_the_full_passport(dynamodb_table, s3_bucket):
    store = DynamoDBPassportStore(dynamodb_table)
    sink = ArtifactSink(f"s3://{s3_bucket}/out")
    ok = big_passport(scan_id="CT_117", values=NUMBERS)
    failed = passport("CT_BAD", status="failed", error={"code": "not_ct", "message": "modality MR is not CT"})
    assert store.put(ok, "job-1", passport_uri=_written(sink, ok))
    assert store.put(failed, "job-1", passport_uri=_written(sink, failed))

    # Readers get the full documents, exactly as written.
    assert store.get("CT_117", "total_fast") == ok
    assert store.get_latest("CT_117") == ok
    assert store.list_by_job("job-1") == [ok, failed]
    assert store.status("CT_117", "total_fast") == "ok" and store.status("CT_BAD", "total_fast") == "failed"
    assert store.status("CT_999", "total_fast") is None

    ddb = boto3.client("dynamodb")
    item = ddb.get_item(TableName=dynamodb_table, Key={"scan_id": {"S": "CT_117"}, "model_key": {"S": "total_fast"}})
    item = item["Item"]
    assert "passport" not in item and "passport_gz" not in item
    assert item["passport_uri"] == {"S": f"s3://{s3_bucket}/out/CT_117/total_fast/passport.json"}
    present = {name for name, st in ok["structures"].items() if st["present"]}
    assert set(item["volume_ml"]["M"]) == present  # presence and volume per structure, nothing else
    assert item["model"]["M"]["key"] == {"S": "total_fast"}
    bad = ddb.get_item(TableName=dynamodb_table, Key={"scan_id": {"S": "CT_BAD"}, "model_key": {"S": "total_fast"}})
    assert bad["Item"]["error_code"] == {"S": "not_ct"} and bad["Item"]["error_message"]["S"].startswith("modality")

    # What it saves: the realistic passport's inline item is about 36 KB (36 write units, twice with an ALL
    # index); the compact one fits one 4 KB read unit and its index copy one write unit.
    compact = dynamodb_item(ok, "job-1", "s3://bucket/out/CT_117/total_fast/passport.json")
    assert item_bytes(compact) < 4096
    assert item_bytes(dynamodb_item(ok, "job-1")) > 30_000
    assert index_item_bytes(compact) < 1024
    index = ddb.describe_table(TableName=dynamodb_table)["Table"]["GlobalSecondaryIndexes"][0]
    assert index["IndexName"] == JOB_INDEX
    assert index["Projection"] == {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["status", "error_code"]}
    projected = ddb.query(
        TableName=dynamodb_table,
        IndexName=JOB_INDEX,
        KeyConditionExpression="job_id = :j",
        ExpressionAttributeValues={":j": {"S": "job-1"}},
    )["Items"]
    assert {k for i in projected for k in i} <= {"scan_id", "model_key", "job_id", "status", "error_code"}


def test_a_passport_file_overwritten_by_another_run_is_an_error_not_another_answer(dynamodb_table, s3_bucket):
    store = DynamoDBPassportStore(dynamodb_table)
    sink = ArtifactSink(f"s3://{s3_bucket}/out")
    newer = passport(created_at="2026-11-27T11:00:00Z", run=2)
    assert store.put(newer, "job-2", passport_uri=_written(sink, newer))
    older = passport(created_at="2026-11-27T10:00:00Z", run=1)
    assert store.put(older, "job-1", passport_uri=_written(sink, older)) is False  # a late retry of an old run
    with pytest.raises(storage.StorageError, match="overwrote"):
        store.get("CT_001", "total_fast")


@pytest.mark.parametrize(
    "bad, error",
    [
        (passport(scan_id="../etc"), InvalidId),
        (passport(model="a/b"), InvalidId),
        ({**passport(), "created_at": "yesterday"}, InvalidPassport),
        ({k: v for k, v in passport().items() if k != "created_at"}, InvalidPassport),
        ({k: v for k, v in passport().items() if k != "model"}, InvalidPassport),
        (passport(blob=object()), InvalidPassport),
    ],
)
def test_invalid_passports_refused(store, bad, error):
    with pytest.raises(error):
        store.put(bad, "job")


@pytest.mark.parametrize("uri", ["postgres://host/db", "sqlite://", "sqlite:///", "dynamodb://a/b", "dynamodb://"])
def test_unknown_store_uris_refused(uri):
    with pytest.raises(storage.UnsupportedUri):
        open_passport_store(uri)


def test_missing_dynamodb_table_is_clear(moto_server):
    with pytest.raises(storage.ObjectNotFound, match="does not exist"):
        open_passport_store("dynamodb://no-such-table").get("CT_001", "total_fast")


# --------------------------------------------------------------------------------------------- artifacts


def test_artifact_sink_s3_layout_and_encryption(s3_bucket):
    sink = ArtifactSink(f"s3://{s3_bucket}/results/")
    files = {
        "mask.nii.gz": "application/gzip",
        "passport.json": "application/json",
        "preview.png": "image/png",
        "seg.dcm": "application/dicom",
    }
    for name in files:
        uri = sink.put("CT_001", "total_fast", name, name.encode())
        assert uri == f"s3://{s3_bucket}/results/CT_001/total_fast/{name}"
        assert storage.read_bytes(uri) == name.encode()
    s3 = boto3.client("s3")
    for name, content_type in files.items():
        head = s3.head_object(Bucket=s3_bucket, Key=f"results/CT_001/total_fast/{name}")
        assert head["ServerSideEncryption"] == "AES256" and head["ContentType"] == content_type
    with pytest.raises(InvalidId):
        sink.put("../CT_002", "total_fast", "mask.nii.gz", b"x")
    assert len(storage.list_uris(f"s3://{s3_bucket}/")) == 4


def test_artifact_sink_local_atomic(tmp_path):
    sink = ArtifactSink(str(tmp_path / "out"))
    uri = sink.put("CT_001", "total_fast", "mask.nii.gz", b"one")
    sink.put("CT_001", "total_fast", "mask.nii.gz", b"two")
    assert uri == str(tmp_path / "out/CT_001/total_fast/mask.nii.gz")
    assert open(uri, "rb").read() == b"two"
    assert os.listdir(tmp_path / "out/CT_001/total_fast") == ["mask.nii.gz"]
    with pytest.raises(InvalidId):
        sink.put("CT_001", "total_fast", "../../escape.png", b"x")
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------------------------------------- summary

ROWS = [
    {
        "job_id": "job-1",
        "scan_id": "CT_001",
        "model_key": "total_fast",
        "status": "ok",
        "read_s": 1.5,
        "segment_s": 42.0,
        "total_s": 45.25,
        "structures_present": 98,
        "liver_ml": 1612.4,
        "finished_at": "2026-11-27T10:00:00Z",
    },
    {
        "job_id": "job-1",
        "scan_id": "CT_002",
        "model_key": "total_fast",
        "status": "failed",
        "error_code": "invalid_scan",
        "error": "modality MR is not CT",
        "read_s": 0.2,
        "total_s": 0.3,
    },
]


def check_summary(table):
    assert table.schema.equals(SUMMARY_SCHEMA, check_metadata=False)
    assert table.column("scan_id").to_pylist() == ["CT_001", "CT_002"]
    assert table.column("error_code").to_pylist() == [None, "invalid_scan"]
    assert table.column("liver_ml").to_pylist() == [1612.4, None]
    assert str(table.column("finished_at")[0].as_py()) == "2026-11-27 10:00:00+00:00"


def test_summary_parquet_local(tmp_path):
    uri = write_summary(ROWS, str(tmp_path / "summary.parquet"))
    check_summary(pq.ParquetFile(uri).read())
    write_summary([], str(tmp_path / "empty.parquet"))
    assert pq.ParquetFile(tmp_path / "empty.parquet").schema_arrow.equals(SUMMARY_SCHEMA, check_metadata=False)


def test_summary_parquet_on_s3(s3_bucket, moto_server):
    uri = f"s3://{s3_bucket}/jobs/job-1/summary.parquet"
    write_summary(ROWS, uri)
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="jobs/job-1/summary.parquet")
    assert head["ServerSideEncryption"] == "AES256"
    check_summary(pq.ParquetFile(io.BytesIO(storage.read_bytes(uri))).read())
    # What Athena-like readers do: read it straight from S3 with pyarrow's own S3 client.
    fs = pafs.S3FileSystem(endpoint_override=moto_server, scheme="http", region="us-east-1")
    check_summary(pq.ParquetFile(f"{s3_bucket}/jobs/job-1/summary.parquet", filesystem=fs).read())


def test_summary_rejects_rows_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="unknown columns"):
        write_summary([{**ROWS[0], "liver_volume": 1.0}], str(tmp_path / "s.parquet"))
    with pytest.raises(ValueError, match="status"):
        write_summary([{"scan_id": "CT_001"}], str(tmp_path / "s.parquet"))
    assert not (tmp_path / "s.parquet").exists()


def test_a_summary_in_parts_reads_as_one_table_and_a_single_file_still_reads(tmp_path):
    uri = str(tmp_path / "_jobs" / "job-1" / "summary.parquet")
    write_summary(ROWS[:1], f"{uri}/plan-a.parquet")
    write_summary(ROWS[1:], f"{uri}/run-b.parquet")
    assert sorted(r["scan_id"] for r in read_summary(uri)) == sorted(r["scan_id"] for r in ROWS)
    clear_summary(uri)
    with pytest.raises(storage.ObjectNotFound):
        read_summary(uri)
    old = str(tmp_path / "old" / "summary.parquet")  # what jobs before the parts wrote
    write_summary(ROWS, old)
    assert read_summary(old) == read_summary(write_summary(ROWS, str(tmp_path / "again.parquet")))
