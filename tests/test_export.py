"""``ray-app export``: a job's passports, stored by the real stores, as one Parquet or CSV table."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest

from ray_app.adapters import cli
from ray_app.core.passport import build_passport, failure_passport
from ray_app.core.scan import scan_from_image
from ray_app.demo.phantom import make_phantom, phantom_labels
from ray_app.ops.export import passport_row
from ray_app.settings import Settings
from ray_app.storage.sinks import open_passport_store

MODEL = {"key": "total-fast-test", "checksum": "0" * 64}


@pytest.fixture(scope="module")
def passports() -> list[dict]:
    """Real passports of two phantoms (their ground-truth labels as the mask) and a failure record."""
    docs = []
    for seed in (1, 2):
        ct, labels = make_phantom(seed, spacing=(6.0, 6.0, 6.0))
        scan = scan_from_image(ct, f"ph-{seed}", Settings())
        docs.append(
            build_passport(
                scan, labels, label_map=phantom_labels(), model=MODEL, timings={"read_s": 0.1}, settings=Settings()
            )
        )
    docs.append(failure_passport("cut", code="truncated_file", message="the file ends early", model=MODEL))
    return docs


def _check(columns: list[str], rows: dict[str, dict], docs: list[dict]) -> None:
    assert columns[:5] == ["scan_id", "status", "error_code", "model", "created_at"]
    assert set(rows) == {"ph-1", "ph-2", "cut"}
    for doc in docs[:2]:
        row = rows[doc["scan_id"]]
        assert (row["status"], row["model"], row["error_code"]) == ("ok", MODEL["key"], None)
        for name, s in doc["structures"].items():  # every structure of the label map has its volume column
            assert row[f"{name}_ml"] == pytest.approx(s["volume_ml"])
    assert rows["ph-1"]["liver_ml"] > 0
    assert rows["cut"]["status"] == "failed" and rows["cut"]["error_code"] == "truncated_file"
    assert rows["cut"]["liver_ml"] is None  # a failure has no volumes, not zeros


def test_export_from_sqlite_to_parquet_and_csv(passports, tmp_path):
    store = open_passport_store(f"sqlite:///{tmp_path / 'p.sqlite'}")
    for doc in passports:
        store.put(doc, "job-x")
    store.put({**passports[0], "scan_id": "other-job"}, "job-y")  # another job's scan stays out

    out = tmp_path / "job-x.parquet"
    assert (
        cli.main(["export", "--job", "job-x", "--passports", f"sqlite:///{tmp_path / 'p.sqlite'}", "--out", str(out)])
        == 0
    )
    table = pq.ParquetFile(out).read()
    assert table.schema.field("liver_ml").type == "double"
    _check(table.column_names, {r["scan_id"]: r for r in table.to_pylist()}, passports)

    out_csv = tmp_path / "job-x.csv"
    assert (
        cli.main(
            ["export", "--job", "job-x", "--passports", f"sqlite:///{tmp_path / 'p.sqlite'}", "--out", str(out_csv)]
        )
        == 0
    )
    with out_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = {
            r["scan_id"]: {k: (float(v) if k.endswith("_ml") and v else v or None) for k, v in r.items()}
            for r in reader
        }
    _check(reader.fieldnames, rows, passports)


def test_export_from_dynamodb(passports, dynamodb_table, tmp_path):
    store = open_passport_store(f"dynamodb://{dynamodb_table}")
    for doc in passports:
        store.put(doc, "job-d")
    out = tmp_path / "d.parquet"
    assert cli.main(["export", "--job", "job-d", "--passports", f"dynamodb://{dynamodb_table}", "--out", str(out)]) == 0
    table = pq.ParquetFile(out).read()
    _check(table.column_names, {r["scan_id"]: r for r in table.to_pylist()}, passports)


def test_a_compact_store_item_exports_like_the_full_passport(passports):
    full = passports[0]
    compact = {
        "scan_id": full["scan_id"],
        "status": "ok",
        "created_at": full["created_at"],
        "model": {"key": MODEL["key"]},
        "passport_uri": "s3://b/ph-1/passport.json",
        "structures": {
            n: {"present": s["present"], "volume_ml": s["volume_ml"]} for n, s in full["structures"].items()
        },
    }
    assert passport_row(compact) == passport_row(full)


def test_csv_cells_never_start_a_spreadsheet_formula():
    from ray_app.ops.export import to_bytes

    text = to_bytes(["scan_id", "error_code"], [{"scan_id": "a1", "error_code": '=HYPERLINK("x")'}], "csv").decode()
    assert text.splitlines()[1].split(",")[1].startswith("\"'=")


def test_unknown_job_and_bad_suffix_are_errors(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'p.sqlite'}"
    assert cli.main(["export", "--job", "nope", "--passports", uri, "--out", str(tmp_path / "x.parquet")]) == 1
    assert "no passports of job 'nope'" in capsys.readouterr().err
    assert cli.main(["export", "--job", "nope", "--passports", uri, "--out", str(tmp_path / "x.xlsx")]) == 2
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.xlsx").exists()
