"""The cost report on job summaries written like the batch job's: every figure follows from its inputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from ray_app.ops import cost
from ray_app.cli import main as cli_main
from ray_app.sinks import write_summary

REPO = Path(__file__).resolve().parent.parent
MASK_BYTES = (3 * 1024**2, 2 * 1024**2)  # two ok scans: masks of 3 and 2 MiB
PASSPORT_BYTES = (5000, 6000)
TOTAL_S = (61.0, 59.0)


def _rows(uri_for) -> list[dict]:
    """Summary rows shaped like ``pipeline.summary_row``'s: two ok scans, one failure, one skipped."""
    rows = []
    for i, (total, mask, passport) in enumerate(zip(TOTAL_S, MASK_BYTES, PASSPORT_BYTES)):
        rows.append({
            "job_id": "job-1", "scan_id": f"scan-{i}", "model_key": "total-fast", "status": "ok",
            "input_uri": f"s3://scans/scan-{i}.nii.gz",
            "mask_uri": uri_for(f"scan-{i}/total-fast/mask.nii.gz", mask),
            "passport_uri": uri_for(f"scan-{i}/total-fast/passport.json", passport),
            "finished_at": "2026-11-27T12:00:00+00:00",
            "read_s": 1.0, "segment_s": total - 4.0, "passport_s": 2.0, "write_s": 1.0, "total_s": total,
            "structures_present": 100, "liver_ml": 1500.0,
        })
    rows.append({"job_id": "job-1", "scan_id": "broken", "model_key": "total-fast", "status": "failed",
                 "error_code": "invalid_input", "error": "not a NIfTI", "read_s": 0.1, "total_s": 0.1})
    rows.append({"job_id": "job-1", "scan_id": "old", "model_key": "total-fast", "status": "skipped"})
    return rows


@pytest.fixture
def local_summary(tmp_path) -> str:
    def put(key: str, size: int) -> str:
        path = tmp_path / "results" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        return str(path)

    return write_summary(_rows(put), str(tmp_path / "results" / "_jobs" / "job-1" / "summary.parquet"))


def test_measure_reads_times_and_result_sizes(local_summary):
    m = cost.measure([local_summary])
    assert m.scans_ok == 2
    assert m.seconds_per_scan == pytest.approx(sum(TOTAL_S) / 2)
    assert m.segment_seconds == pytest.approx(sum(TOTAL_S) / 2 - 4.0)
    assert m.mask_bytes == pytest.approx(sum(MASK_BYTES) / 2)
    assert m.passport_bytes == pytest.approx(sum(PASSPORT_BYTES) / 2)
    assert m.objects_per_scan == 2


def test_lines_follow_from_the_inputs_recomputed_by_hand(local_summary):
    prices = cost.load_prices()
    a = cost.Assumptions(scans_per_month=10_000)
    report = cost.estimate(cost.measure([local_summary]), a, prices)

    # Spot CPU: 10,000 scans x 60 s mean / 2 actors per node = 83.33 node-h, + 30 jobs x 10 min = 5 node-h;
    # priced at the c7i.4xlarge Spot price plus 150 GB of gp3 spread over 730 h.
    spot = report.compute["Spot CPU"]
    node_hours = 10_000 * 60.0 / 3600 / 2 + 30 * 10 / 60
    hourly = prices["ec2_spot_per_hour"]["c7i.4xlarge"] + 150 * prices["ebs_gp3_per_gb_month"] / 730
    assert spot.quantity == pytest.approx(node_hours)
    assert spot.monthly_usd == pytest.approx(node_hours * hourly)
    assert report.compute["on-demand CPU"].unit_price > spot.unit_price

    lines = {line.item: line for line in report.shared}
    mask_gb = 2.5 * 1024**2 / 1024**3
    passport_gb = 5500 / 1024**3
    standard = lines["S3 Standard: newest month's masks + all passports"]
    assert standard.monthly_usd == pytest.approx(10_000 * (mask_gb + 12 * passport_gb) * 0.023)
    writes = lines["DynamoDB writes (table + job index)"]  # 5,500 B -> 6 write units, twice (table + GSI)
    assert writes.monthly_usd == pytest.approx(10_000 * 2 * math.ceil(5500 / 1024) / 1e6 * 0.625)
    egress = lines["egress to the internet"]
    assert egress.monthly_usd == pytest.approx(10_000 * mask_gb * 0.09)

    total = report.total("Spot CPU")
    assert total == pytest.approx(spot.monthly_usd + sum(line.monthly_usd for line in report.shared))
    assert report.per_1k(total) == pytest.approx(total / 10)
    assert report.compute["Spot GPU"] is None and report.total("Spot GPU") is None  # no GPU run measured


def test_a_gpu_summary_prices_the_gpu_workers(local_summary, tmp_path):
    gpu = cost.measure([local_summary])
    report = cost.estimate(cost.measure([local_summary]), cost.Assumptions(scans_per_month=1000),
                           cost.load_prices(), gpu_measured=gpu)
    prices = cost.load_prices()
    assert report.compute["Spot GPU"].unit_price == pytest.approx(
        prices["ec2_spot_per_hour"]["g6.xlarge"] + 150 * prices["ebs_gp3_per_gb_month"] / 730)
    assert report.compute["Spot GPU"].quantity == pytest.approx(1000 * 60.0 / 3600 / 1 + 5)


def test_prices_are_dated_sourced_and_overridable(tmp_path):
    prices = cost.load_prices()
    assert prices["taken"] and prices["source"] and prices["currency"] == "USD"
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"ec2_spot_per_hour": {"c7i.4xlarge": 0.25}, "taken": "2027-01-01"}))
    merged = cost.load_prices(str(override))
    assert merged["ec2_spot_per_hour"]["c7i.4xlarge"] == 0.25
    assert merged["ec2_spot_per_hour"]["g6.xlarge"] == prices["ec2_spot_per_hour"]["g6.xlarge"]
    assert merged["taken"] == "2027-01-01"


def test_unknown_mask_size_is_an_error_unless_given(tmp_path):
    summary = write_summary(_rows(lambda key, size: f"{tmp_path}/gone/{key}"), str(tmp_path / "summary.parquet"))
    measured = cost.measure([summary])
    with pytest.raises(cost.CostInputError, match="--mask-mb"):
        cost.estimate(measured, cost.Assumptions(scans_per_month=100), cost.load_prices())
    report = cost.estimate(measured, cost.Assumptions(scans_per_month=100, mask_mb=2.0, passport_kb=5.0),
                           cost.load_prices())
    assert report.total("Spot CPU") > 0


def test_cost_command_on_a_summary_in_s3(moto_server, s3_bucket, capsys):
    s3 = boto3.client("s3")

    def put(key: str, size: int) -> str:
        s3.put_object(Bucket=s3_bucket, Key=f"ct/{key}", Body=b"\0" * size)
        return f"s3://{s3_bucket}/ct/{key}"

    summary = write_summary(_rows(put), f"s3://{s3_bucket}/ct/_jobs/job-1/summary.parquet")
    assert cli_main(["cost", "--summary", summary, "--scans-per-month", "5000", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = cost.estimate(cost.measure([summary]), cost.Assumptions(scans_per_month=5000), cost.load_prices())
    assert printed["measured"]["mask_bytes"] == pytest.approx(sum(MASK_BYTES) / 2)
    assert printed["totals"]["Spot CPU"] == pytest.approx(expected.total("Spot CPU"))
    assert printed["per_1k_scans"]["Spot CPU"] == pytest.approx(expected.total("Spot CPU") / 5)


def test_cost_report_job_prints_the_table_and_exits_cleanly(local_summary):
    # Eight runs: reading Parquet through pyarrow's dataset layer made about half of the runs abort at exit
    # ("terminate called without an active exception") after printing the table.
    for _ in range(8):
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "cost_report.py"), "--summary", local_summary,
                               "--scans-per-month", "10000"], check=False, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("compute: Spot c7i.4xlarge", "compute: on-demand c7i.4xlarge", "S3 Glacier IR", "DynamoDB writes",
                 "egress", "CloudWatch Logs", "total with Spot CPU", "per 1k", "prices taken"):
        assert text in out
