"""The batch job's metrics, scraped for real from the local Ray node's Prometheus endpoint on 127.0.0.1."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from ray_app.adapters import metrics
from ray_app.adapters.batch import BatchConfig, run_batch

_LINE = re.compile(r"^(?P<name>\w+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def _scrape(job_id: str) -> tuple[str, dict[tuple[str, frozenset], float]]:
    """The endpoint's text and, per (name, labels we set), the job's values summed over worker processes."""
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    text = urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or "ray_app_" not in m["name"]:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if labels.get("job_id") != job_id:  # other tests' jobs share this Ray
            continue
        mine = frozenset((k, v) for k, v in labels.items() if k in ("status", "error_code", "stage", "le"))
        out[(m["name"], mine)] = out.get((m["name"], mine), 0.0) + float(m["value"])
    return text, out


SCANS = metrics.PREFIX + metrics.SCANS + "_total"
OK = (SCANS, frozenset({("status", "ok"), ("error_code", "")}))
CUT = (SCANS, frozenset({("status", "failed"), ("error_code", "truncated_file")}))
SEGMENTED = (metrics.PREFIX + metrics.STAGE_SECONDS + "_count", frozenset({("stage", "segment_s")}))


@pytest.mark.timeout(300)
def test_a_local_job_counts_its_scans_and_stage_seconds_on_rays_metrics_endpoint(ray_cluster, tmp_path):
    from tests._scan_factory import small_phantom

    _, before = _scrape("met-1")
    (tmp_path / "fine.nii.gz").write_bytes(small_phantom(901))
    (tmp_path / "cut.nii.gz").write_bytes(small_phantom(902)[:2000])
    (tmp_path / "m.csv").write_text(
        f"scan_id,uri\nqz-fine,{tmp_path / 'fine.nii.gz'}\nqz-cut,{tmp_path / 'cut.nii.gz'}\n"
    )
    done = run_batch(
        BatchConfig(manifest=str(tmp_path / "m.csv"), output=str(tmp_path / "out"), job_id="met-1", max_actors=1)
    )
    assert done.succeeded == 1 and done.failed == 1

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    deadline = time.monotonic() + 60  # Ray exports user metrics every few seconds
    while True:
        text, after = _scrape("met-1")
        if (delta(OK), delta(CUT), delta(SEGMENTED)) == (1.0, 1.0, 1.0) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert (delta(OK), delta(CUT), delta(SEGMENTED)) == (1.0, 1.0, 1.0)
    # Every scan's total seconds land in the histogram's buckets; the +Inf bucket holds both scans.
    total_inf = (metrics.PREFIX + metrics.STAGE_SECONDS + "_bucket", frozenset({("stage", "total_s"), ("le", "+Inf")}))
    assert delta(total_inf) == 2.0
    assert "qz-" not in text  # no scan ids as labels
