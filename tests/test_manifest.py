"""Manifests in every format and place: valid rows come back, every bad row is reported by number."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_app import storage
from ray_app.storage.manifest import ManifestError, read_manifest

GOOD = [
    {"scan_id": "CT_001", "uri": "s3://scans/CT_001.nii.gz", "site": "A"},
    {"scan_id": "CT_002", "uri": "/data/CT_002.nii.gz", "site": "B"},
    {"scan_id": "ct-3.v2", "uri": "s3://scans/dicom/ct3/", "site": ""},
]


def encode(rows: list[dict], fmt: str) -> bytes:
    if fmt == "csv":
        header = list(rows[0])
        return ("\n".join([",".join(header)] + [",".join(r[c] for c in header) for r in rows]) + "\n").encode()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """Writes bytes to a local file or a moto S3 object and returns the URI."""
    if request.param == "local":
        return lambda name, data: storage.write_bytes(str(tmp_path / name), data)
    bucket = request.getfixturevalue("s3_bucket")
    return lambda name, data: storage.write_bytes(f"s3://{bucket}/manifests/{name}", data)


def codes(result) -> dict[int, str]:
    return {p.row: p.code for p in result.problems}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_valid_manifest_every_format_and_place(place, fmt):
    result = read_manifest(place(f"m.{fmt}", encode(GOOD, fmt)))
    assert result.problems == []
    assert result.rows == GOOD  # extra columns kept
    assert result.columns == ["scan_id", "uri", "site"]
    assert [row["scan_id"] for row in result.rows] == ["CT_001", "CT_002", "ct-3.v2"]


CSV_WITH_PROBLEMS = b"\n".join(
    [
        b"scan_id,uri,note",
        b"ok1,s3://bkt/ok1.nii.gz,first",  # 1
        b"ok1,s3://bkt/again.nii.gz,dup",  # 2 duplicate of row 1
        b"",  # 3 empty
        b"../etc,/x.nii.gz,traversal",  # 4
        b'"=HYPERLINK(""http://evil/""; ""click"")",s3://bkt/x.nii.gz,formula',  # 5
        b"ok2,s3://bkt/ok2.nii.gz",  # 6 too few fields
        b"ok3,http://evil/x.nii.gz,scheme",  # 7
        b"caf\xe9,s3://bkt/c.nii.gz,latin-1",  # 8
        b"ok4,,no uri",  # 9
        b"a\x01b,s3://bkt/x.nii.gz,control",  # 10
        b"ok5,s3://bkt/ok5.nii.gz,fine",  # 11
        b"ok6,s3://bkt/ok6.nii.gz,fine,extra",  # 12 too many fields
        b"ok7,=cmd|' /C calc'!A0,formula uri",  # 13
        b" , ,",  # 14 blank fields only
        b"ok8,s3://bkt/ok8.nii.gz,caf\xe9",  # 15 non-UTF-8 outside the id
        b"a/b,s3://bkt/x.nii.gz,slash",  # 16
    ]
)


def test_csv_problems_reported_by_row(place):
    result = read_manifest(place("bad.csv", CSV_WITH_PROBLEMS))
    assert [r["scan_id"] for r in result.rows] == ["ok1", "ok5"]
    assert codes(result) == {
        2: "duplicate_scan_id",
        3: "empty_row",
        4: "invalid_scan_id",
        5: "formula_injection",
        6: "malformed_row",
        7: "invalid_uri",
        8: "not_utf8",
        9: "missing_field",
        10: "invalid_scan_id",
        12: "malformed_row",
        13: "formula_injection",
        14: "empty_row",
        15: "not_utf8",
        16: "invalid_scan_id",
    }
    assert len(result.rows) + len(result.problems) == 16  # nothing dropped silently
    dup = next(p for p in result.problems if p.row == 2)
    assert dup.scan_id == "ok1" and "row 1" in dup.message
    assert next(p for p in result.problems if p.row == 5).scan_id is None  # hostile ids are not echoed as ids


def test_jsonl_problems_reported_by_line(tmp_path):
    lines = [
        b'{"scan_id": "ok1", "uri": "s3://bkt/ok1.nii.gz", "age": 61}',
        b'{"scan_id": "ok1", "uri": "s3://bkt/dup.nii.gz"}',
        b"   ",
        b'{"scan_id": "ok2", "uri": ',
        b'["ok3", "s3://bkt/ok3.nii.gz"]',
        b'{"scan_id": 17, "uri": "s3://bkt/17.nii.gz"}',
        b'{"scan_id": "caf\xe9", "uri": "s3://bkt/c.nii.gz"}',
        b'{"scan_id": "..", "uri": "s3://bkt/x.nii.gz"}',
        b'{"scan_id": "@SUM(A1)", "uri": "s3://bkt/x.nii.gz"}',
        b'{"scan_id": "ok4"}',
        b'{"scan_id": "ok5", "uri": "file:///etc/passwd"}',
        b'{"scan_id": "ok6", "uri": "s3://bkt/ok6.nii.gz", "age": null}',
        b"{}",
    ]
    result = read_manifest(storage.write_bytes(str(tmp_path / "m.jsonl"), b"\r\n".join(lines) + b"\n"))
    assert result.rows == [
        {"scan_id": "ok1", "uri": "s3://bkt/ok1.nii.gz", "age": 61},
        {"scan_id": "ok6", "uri": "s3://bkt/ok6.nii.gz", "age": None},
    ]
    assert codes(result) == {
        2: "duplicate_scan_id",
        3: "empty_row",
        4: "malformed_row",
        5: "malformed_row",
        6: "malformed_row",
        7: "not_utf8",
        8: "invalid_scan_id",
        9: "formula_injection",
        10: "missing_field",
        11: "invalid_uri",
        13: "empty_row",
    }


def test_parquet_problems_reported_by_row(tmp_path):
    table = pa.table(
        {
            "scan_id": pa.array([b"ok1", b"\xffbad", b"ok1", None, b"=1+1", b"ok2", b"ok3"], pa.binary()),
            "uri": ["s3://bkt/1", "s3://bkt/2", "s3://bkt/3", "s3://bkt/4", "s3://bkt/5", None, "s3://bkt/ok3"],
            "weight": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    result = read_manifest(storage.write_bytes(str(tmp_path / "m.parquet"), buf.getvalue()))
    assert result.rows == [
        {"scan_id": "ok1", "uri": "s3://bkt/1", "weight": 1.0},
        {"scan_id": "ok3", "uri": "s3://bkt/ok3", "weight": 7.0},
    ]
    assert codes(result) == {
        2: "not_utf8",
        3: "duplicate_scan_id",
        4: "missing_field",
        5: "formula_injection",
        6: "missing_field",
    }


@pytest.mark.parametrize(
    "name, data",
    [
        ("m.csv", b"scan_id,path\nCT_001,s3://bkt/x\n"),
        ("m.csv", b"id,uri\n"),
        ("m.jsonl", b'{"scan_id": "CT_001", "path": "s3://bkt/x"}\n'),
        ("m.parquet", encode([{"uri": "s3://bkt/x"}], "parquet")),
    ],
)
def test_missing_columns_fail_the_whole_manifest(place, name, data):
    with pytest.raises(ManifestError) as excinfo:
        read_manifest(place(name, data))
    assert excinfo.value.code == "invalid_manifest"
    assert "lacks required column" in str(excinfo.value)


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("m.csv", b"", "empty"),
        ("m.csv", b"scan_id,uri,uri\n", "repeated"),
        ("m.parquet", b"not parquet at all", "Parquet"),
        ("m.txt", b"scan_id,uri\n", "unsupported manifest format"),
        ("m.jsonl", b"", "lacks required column"),
    ],
)
def test_unusable_manifests_fail_clearly(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(path))


def test_manifest_size_limit_and_missing_file(tmp_path):
    path = storage.write_bytes(str(tmp_path / "m.csv"), encode(GOOD, "csv"))
    with pytest.raises(storage.ObjectTooLarge):
        read_manifest(path, max_bytes=10)
    with pytest.raises(storage.ObjectNotFound):
        read_manifest(str(tmp_path / "absent.csv"))
