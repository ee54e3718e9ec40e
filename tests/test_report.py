"""The job report: rendered from a real batch job's summary, plots embedded, planted outliers listed."""

from __future__ import annotations

import base64
import re

import pytest

from ray_app.adapters import cli
from ray_app.adapters.batch import BatchConfig, run_batch
from ray_app.ops import report
from ray_app.storage.sinks import read_summary, write_summary

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def real_summary(ray_cluster, tmp_path_factory) -> str:
    """A real job: 3 small phantoms and a truncated file, on the local Ray; returns its summary's path."""
    from tests._scan_factory import small_phantom

    tmp = tmp_path_factory.mktemp("report-job")
    lines = ["scan_id,uri"]
    for i in range(3):
        (tmp / f"ph-{i}.nii.gz").write_bytes(small_phantom(700 + i))
        lines.append(f"ph-{i},{tmp / f'ph-{i}.nii.gz'}")
    (tmp / "cut.nii.gz").write_bytes(small_phantom(710)[:2000])
    lines.append(f"cut,{tmp / 'cut.nii.gz'}")
    (tmp / "m.csv").write_text("\n".join(lines) + "\n")
    done = run_batch(BatchConfig(manifest=str(tmp / "m.csv"), output=str(tmp / "out"), job_id="rep-1", max_actors=1))
    assert done.succeeded == 3 and done.failed == 1
    return done.summary_uri


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_of_a_real_job_shows_statuses_stages_and_lists_a_planted_12_ml_liver(real_summary, tmp_path):
    rows = read_summary(real_summary)
    adult = {
        "liver_ml": 1600.0,
        "spleen_ml": 220.0,
        "kidney_left_ml": 160.0,
        "kidney_right_ml": 155.0,
        "pancreas_ml": 75.0,
    }
    planted = [
        {"job_id": "rep-1", "scan_id": "tiny-liver", "status": "ok", "segment_s": 3.0, **adult, "liver_ml": 12.0},
        *(
            {
                "job_id": "rep-1",
                "scan_id": f"adult-{i}",
                "status": "ok",
                "segment_s": 3.0,
                **{k: v * (1 + 0.02 * i) for k, v in adult.items()},
            }
            for i in range(8)
        ),
    ]
    uri = write_summary([*rows, *planted], str(tmp_path / "summary.parquet"))

    assert cli.main(["report", "--summary", uri, "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()

    images = _images(page)
    assert len(images) == 3 and all(i.startswith(b"\x89PNG\r\n\x1a\n") and len(i) > 5000 for i in images)
    assert "http://" not in page and "https://" not in page  # opens offline: nothing to fetch
    assert (
        "13 scans: 12 ok" in page
        and "1 failed</span>;" in page
        and re.search(r"\d+ scans? with a volume worth a\s+look \(\d+ organ volumes?\)", page)
    )
    assert "<td>cut</td><td>failed</td><td>truncated_file</td>" in page  # the real failure, by code

    listed = dict(re.findall(r"<tr class=outlier><td>([^<]+)</td><td>liver</td><td>([^<]+)</td>", page))
    assert listed.get("tiny-liver") == "12.0"
    assert not any(sid.startswith("adult-") for sid in listed)  # normal adult livers are not flagged
    why = re.search(r"<td>tiny-liver</td><td>liver</td><td>12.0</td><td>([^<]+)</td>", page).group(1)
    assert why.startswith("below adult reference 800 ml")
    # Every stage's seconds are in the table: the real job's 4 scans read, 3 segmented, plus the 9 planted.
    assert "<tr><td>read_s</td><td>4</td>" in page and "<tr><td>segment_s</td><td>12</td>" in page
    assert "<tr><td>passport_s</td><td>3</td>" in page


def test_outlier_rules():
    rows = [{"scan_id": f"s{i}", "status": "ok", "spleen_ml": 200.0 + i} for i in range(8)]
    assert report.outliers(rows) == []
    rows.append({"scan_id": "big", "status": "ok", "spleen_ml": 450.0})  # in the adult range, far off this job's
    rows.append({"scan_id": "gone", "status": "failed", "spleen_ml": 5.0})  # failures have no volume to judge
    [big] = report.outliers(rows)
    assert (big.scan_id, big.organ) == ("big", "spleen") and big.reasons[0].startswith("above this job's upper IQR")
    few = [{"scan_id": "a", "status": "ok", "pancreas_ml": 70.0}, {"scan_id": "b", "status": "ok", "pancreas_ml": 10.0}]
    [small] = report.outliers(few)  # too few scans for fences: the reference range alone
    assert small.scan_id == "b" and small.reasons == ("below adult reference 25 ml",)


def test_report_of_a_missing_summary_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", "--summary", str(tmp_path / "nope.parquet"), "--out", str(tmp_path)]) == 2
    assert "cannot write the report" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()
