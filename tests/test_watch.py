"""``ray-app status JOB``: counts, rate and ETA of a job from its passports while it runs."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from ray_app.adapters import cli
from ray_app.core.passport import failure_passport
from ray_app.ops.watch import job_status
from ray_app.storage.sinks import open_passport_store

MODEL = {"key": "total-fast-test"}


def _doc(scan_id: str, at: datetime, code: str | None = None) -> dict:
    doc = failure_passport(scan_id, code=code or "x", message="m", model=MODEL)
    if code is None:  # a succeeded scan's store entry: what status reads of it
        doc.update(status="ok", error=None)
    doc["created_at"] = at.isoformat()
    return doc


@pytest.fixture
def running_job(tmp_path):
    """Job 'j1', started 4 minutes ago, 10 rows in its manifest: 4 passports so far, one a minute, one failed."""
    now = datetime.now(timezone.utc)
    start = now - timedelta(minutes=4)
    store_uri = f"sqlite:///{tmp_path / 'p.sqlite'}"
    store = open_passport_store(store_uri)
    for i in range(4):
        store.put(_doc(f"s{i}", start + timedelta(minutes=i + 1), "truncated_file" if i == 2 else None), "j1")
    store.put(_doc("other", now), "j0")  # another job's passport is not counted
    out = tmp_path / "out"
    (out / "_jobs" / "j1").mkdir(parents=True)
    manifest = tmp_path / "m.csv"
    manifest.write_text("scan_id,uri\n" + "".join(f"s{i},/data/s{i}.nii.gz\n" for i in range(10)))
    (out / "_jobs" / "j1" / "job.json").write_text(
        json.dumps({"job_id": "j1", "started_at": start.isoformat(), "manifest": str(manifest), "limit": None})
    )
    return store_uri, out, now


def test_status_counts_rate_and_eta_from_the_jobs_record(running_job, capsys):
    store_uri, out, now = running_job
    assert cli.main(["status", "j1", "--passports", store_uri, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "job j1: 4 scans done of 10" in text
    assert "  ok: 3" in text and "  failed: 1" in text and "    truncated_file: 1" in text
    rate = float(text.split("rate: ")[1].split()[0])
    assert rate == pytest.approx(1.0, rel=0.05)  # 4 scans in the 4 minutes since the record's start
    eta = float(text.split("ETA: ")[1].split()[0])
    assert eta == pytest.approx(6.0, rel=0.05)  # 6 scans left at 1 a minute


def test_total_overrides_and_a_limit_caps_the_size(running_job, capsys):
    store_uri, out, now = running_job
    assert cli.main(["status", "j1", "--passports", store_uri, "--total", "4"]) == 0
    text = capsys.readouterr().out
    assert "4 scans done of 4" in text and "ETA: done" in text
    assert float(text.split("rate: ")[1].split()[0]) == pytest.approx(1.0)  # first to last passport: 3 in 3 min

    record = out / "_jobs" / "j1" / "job.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "limit": 5}))
    assert cli.main(["status", "j1", "--passports", store_uri, "--output", str(out)]) == 0
    assert "4 scans done of 5" in capsys.readouterr().out


def test_without_a_size_there_is_no_eta_and_an_unknown_job_is_reported_empty(running_job, capsys):
    store_uri, _, _ = running_job
    assert cli.main(["status", "j1", "--passports", store_uri]) == 0
    assert "ETA: unknown" in capsys.readouterr().out
    st = job_status("nope", open_passport_store(store_uri).list_by_job("nope"), total=3)
    assert st.done == 0 and st.per_minute is None and st.eta_minutes is None


def test_a_missing_job_record_is_an_error(running_job, tmp_path, capsys):
    store_uri, _, _ = running_job
    assert cli.main(["status", "j1", "--passports", store_uri, "--output", str(tmp_path / "elsewhere")]) == 2
    assert "error" in capsys.readouterr().err
