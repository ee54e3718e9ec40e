"""A large manifest against DynamoDB: the resume check asks the store in batches, counted at the wire.

The job runs as its own process with its own local Ray, so that every worker talks to AWS through the recording
proxy (``tests/faultproxy.py`` with no faults): the count is of HTTP requests that reached the store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import boto3
import pytest

from ray_app.storage.sinks import dynamodb_item, read_summary_table
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.slow

RAY_APP = str(Path(sys.executable).with_name("ray-app"))
MODEL = "total_fast"
ROWS = 20_000
READS = {"GetItem", "BatchGetItem", "Query", "Scan"}


def _mark_done(table: str, scan_ids: list[str]) -> None:
    """Store an ``ok`` passport for each scan, 25 to a request (the way a test fills a table, not the job)."""
    ddb = boto3.client("dynamodb")
    for start in range(0, len(scan_ids), 25):
        puts = [
            {
                "PutRequest": {
                    "Item": dynamodb_item(
                        {"scan_id": sid, "model": {"key": MODEL}, "status": "ok", "created_at": "2026-01-01T00:00:00"},
                        "earlier",
                    )
                }
            }
            for sid in scan_ids[start : start + 25]
        ]
        assert not ddb.batch_write_item(RequestItems={table: puts}).get("UnprocessedItems")


def test_a_20000_row_manifest_half_done_runs_the_other_half_with_batched_store_reads(
    moto_server, dynamodb_table, tmp_path
):
    ids = [f"scan-{i:05d}" for i in range(ROWS)]
    done = ids[::2]  # every other row, so each block of the plan mixes both kinds
    _mark_done(dynamodb_table, done)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,uri\n" + "".join(f"{sid},{tmp_path / 'absent' / sid}.nii.gz\n" for sid in ids))
    out = tmp_path / "out"
    argv = ["batch", "--manifest", str(manifest), "--output", str(out), "--table", dynamodb_table]

    with FaultProxy(moto_server, every=0) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        env.pop("RAY_ADDRESS", None)
        run = subprocess.run(
            [RAY_APP, *argv, "--job-id", "half", "--max-actors", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert run.returncode == 1, (run.stdout + run.stderr)[-4000:]  # the half that ran failed: the files are absent
    calls = Counter(r.target.split(".")[-1] for r in proxy.requests if r.service == "dynamodb")
    reads = sum(n for op, n in calls.items() if op in READS)
    assert reads <= ROWS / 50, calls
    assert calls["PutItem"] == ROWS - len(done), calls  # only the other half ran: one failure record each
    summary = read_summary_table(str(out / "_jobs" / "half" / "summary.parquet"), ["scan_id", "status", "error_code"])
    by_status = Counter(summary["status"].to_pylist())
    assert by_status == {"skipped": len(done), "failed": ROWS - len(done)}
    assert (
        sorted(s for s, st in zip(summary["scan_id"].to_pylist(), summary["status"].to_pylist()) if st == "skipped")
        == done
    )
    assert set(summary["error_code"].to_pylist()) == {None, "scan_not_found"}
    assert f"{len(done)} skipped" in run.stdout
    print(f"{sum(calls.values())} DynamoDB requests for {ROWS} rows: {dict(calls)}")
