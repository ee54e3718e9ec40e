"""The cost report on job summaries written like the batch job's: every figure follows from its inputs, the head
is paid for the hours jobs run, compute follows CPU-seconds whatever actor size measured them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ray_app.adapters.batch import BatchConfig, plan_shape
from ray_app.adapters.cli import main as cli_main
from ray_app.ops import cost
from ray_app.storage.results import USAGE_COLUMNS
from ray_app.storage.sinks import read_summary, write_summary

REPO = Path(__file__).resolve().parent.parent
MiB = 1024**2
# Two ok scans as a 1-CPU actor on a 2-core machine measured them.
SEGMENT_S, PASSPORT_S, READ_S, TOTAL_S = (56.0, 54.0), (2.0, 2.0), (1.0, 1.0), (61.0, 59.0)
BYTES = (
    {"mask": 3 * MiB, "passport": 36_000, "preview": 60_000},
    {"mask": 2 * MiB, "passport": 34_000, "preview": 50_000},
)
ITEM_BYTES, INDEX_BYTES = 3100, 75


def _rows(actor_cpus: float | None = 1.0, node_cpus: int | None = 2, scale: float = 1.0) -> list[dict]:
    """Summary rows shaped like ``pipeline.summary_row``'s: two ok scans, one failure, one skipped. ``scale``
    multiplies the actor's seconds (a run with more threads is faster)."""
    rows = []
    for i, (seg, pas, read, total, b) in enumerate(zip(SEGMENT_S, PASSPORT_S, READ_S, TOTAL_S, BYTES)):
        write = total - read - seg - pas
        rows.append(
            {
                "job_id": "job-1",
                "scan_id": f"scan-{i}",
                "model_key": "total_fast",
                "status": "ok",
                "input_uri": f"s3://scans/scan-{i}.nii.gz",
                "mask_uri": f"s3://out/scan-{i}/total_fast/mask.nii.gz",
                "passport_uri": f"s3://out/scan-{i}/total_fast/passport.json",
                "finished_at": "2026-11-27T12:00:00+00:00",
                "read_s": read,
                "segment_s": seg * scale,
                "passport_s": pas * scale,
                "write_s": write,
                "total_s": read + (seg + pas) * scale + write,
                "structures_present": 100,
                "liver_ml": 1500.0,
                "actor_cpus": actor_cpus,
                "actor_gpus": 0.0,
                "node_cpus": node_cpus,
                "objects_written": 3,
                "bytes_written": sum(b.values()),
                "large_objects_written": 1,
                "large_bytes_written": b["mask"],
                "store_item_bytes": ITEM_BYTES,
                "store_index_bytes": INDEX_BYTES,
            }
        )
    rows.append(
        {
            "job_id": "job-1",
            "scan_id": "broken",
            "model_key": "total_fast",
            "status": "failed",
            "error_code": "invalid_input",
            "error": "not a NIfTI",
            "read_s": 0.1,
            "total_s": 0.1,
        }
    )
    rows.append({"job_id": "job-1", "scan_id": "old", "model_key": "total_fast", "status": "skipped"})
    return rows


@pytest.fixture
def local_summary(tmp_path) -> str:
    return write_summary(_rows(), str(tmp_path / "results" / "_jobs" / "job-1" / "summary.parquet"))


def _lines(report: cost.CostReport) -> list[cost.LineItem]:
    return [
        x for x in (*report.compute.values(), *report.head.values(), *report.shared, *report.serve) if x is not None
    ]


def test_measure_reads_cpu_seconds_and_bytes_from_the_summary_alone(local_summary):
    m = cost.measure([local_summary])
    assert m.scans_ok == 2
    actor = [s + p for s, p in zip(SEGMENT_S, PASSPORT_S)]
    tasks = [t - a for t, a in zip(TOTAL_S, actor)]  # fetch + write: the rest of the scan's seconds
    assert m.actor_seconds == pytest.approx(sum(actor) / 2)
    assert m.task_seconds == pytest.approx(sum(tasks) / 2)
    assert m.cpu_seconds_per_scan == pytest.approx(1 * sum(actor) / 2 + sum(tasks) / 2)  # 1-CPU actor
    assert m.node_cpus == 2 and m.actor_cpus == 1
    assert m.objects_per_scan == 3
    assert m.bytes_per_scan == pytest.approx(sum(sum(b.values()) for b in BYTES) / 2)
    assert m.large_bytes_per_scan == pytest.approx(2.5 * MiB)
    assert m.store_item_bytes == ITEM_BYTES


def test_every_line_is_quantity_times_price_and_the_batch_lines_recomputed_by_hand(local_summary):
    prices = cost.load_prices()
    a = cost.Assumptions(scans_per_month=10_000, nodes_per_job=1)
    m = cost.measure([local_summary])
    report = cost.estimate(m, a, prices)
    for line in _lines(report):
        assert line.monthly_usd == pytest.approx(line.quantity * line.unit_price), line.item

    # Spot CPU on the default worker (cluster.yaml's m7a.4xlarge, 2-thread actors): per scan, the 1-thread actor's
    # 57 s (segment + passport) become 57 / e(2) s of 2-thread actor time; the 3 s of fetch and write tasks stay
    # single-threaded; 16 vCPUs that are 16 cores (yield 1) do that per second, 8 actors of 6 GB fitting 64 GiB.
    assert (a.cpu_instance, a.cpus_per_actor, a.head_instance) == ("m7a.4xlarge", 2, "m7i.large")
    e2 = cost.PARALLEL_EFFICIENCY_2
    assert cost.efficiency(2) == pytest.approx(e2)
    node_s = (57.0 / e2 + 3.0) / (16 * 1.0)
    scan_node_h = 10_000 * node_s / 3600
    spot = report.compute["Spot CPU"]
    assert spot.quantity == pytest.approx(scan_node_h + 1 * 30 * 5 / 60)  # + 1 node x 30 jobs x 5 min start-up
    assert report.plan["Spot CPU"]["actors_per_node"] == 8
    hourly = prices["ec2_spot_per_hour"]["m7a.4xlarge"] + 150 * prices["ebs_gp3_per_gb_month"] / 730
    assert spot.unit_price == pytest.approx(hourly)
    assert report.compute["on-demand CPU"].unit_price > spot.unit_price

    # The head runs while jobs run: 30 x (the job's scan hours on its node + 6 + 5 + 2 minutes), not 730 h.
    head = report.head["Spot CPU"]
    assert head.quantity == pytest.approx(30 * (scan_node_h / 30 + 13 / 60))
    assert head.quantity < 100
    assert head.unit_price == pytest.approx(
        prices["ec2_on_demand_per_hour"]["m7i.large"] + 150 * prices["ebs_gp3_per_gb_month"] / 730
    )

    lines = {line.item: line for line in report.shared}
    large_gb, small_gb = 2.5 * MiB / 1024**3, 90_000 / 1024**3  # masks; passports + previews
    standard = lines["S3 Standard: new large + all small objects"]
    assert standard.quantity == pytest.approx(10_000 * (large_gb + 12 * small_gb))
    assert lines["S3 PUT: results"].quantity == pytest.approx(10_000 * 3 / 1000)  # mask, passport, preview
    writes = lines["DynamoDB writes (table + job index)"]  # 3,100 B -> 4 write units; index copy 1
    assert writes.quantity == pytest.approx(10_000 * (4 + 1) / 1e6)
    assert lines["DynamoDB reads (resume check)"].quantity == pytest.approx(10_000 * 1 / 1e6)
    assert lines["egress to the internet"].quantity == pytest.approx(10_000 * (large_gb + small_gb))

    total = report.total("Spot CPU")
    assert total == pytest.approx(spot.monthly_usd + head.monthly_usd + sum(x.monthly_usd for x in report.shared))
    assert report.per_1k(total) == pytest.approx(total / 10)
    assert report.compute["Spot GPU"] is None and report.total("Spot GPU") is None  # no GPU run measured


def test_head_hours_follow_the_jobs_not_the_month(local_summary):
    m, prices = cost.measure([local_summary]), cost.load_prices()
    a = cost.Assumptions(scans_per_month=10_000, jobs_per_month=30, nodes_per_job=2)
    once, twice = (cost.estimate(m, dataclasses.replace(a, jobs_per_month=j), prices) for j in (30, 60))
    per_job = (a.head_startup_minutes + a.node_startup_minutes + a.head_teardown_minutes) / 60
    # Twice the jobs, the same scans: the head pays 30 more start-ups and teardowns, nothing else.
    assert twice.head["Spot CPU"].quantity - once.head["Spot CPU"].quantity == pytest.approx(30 * per_job)
    # ... and each job's 2 worker nodes one more start-up each.
    assert twice.compute["Spot CPU"].quantity - once.compute["Spot CPU"].quantity == pytest.approx(
        30 * 2 * a.node_startup_minutes / 60
    )
    assert once.head["Spot CPU"].quantity < cost.HOURS_PER_MONTH / 10


def test_a_million_scans_is_the_per_scan_lines_times_a_hundred_plus_the_fixed_ones(local_summary):
    m, prices = cost.measure([local_summary]), cost.load_prices()
    small, big = cost.estimate_at([10_000, 1_000_000], m, cost.Assumptions(scans_per_month=0, nodes_per_job=4), prices)
    for a_line, b_line in zip(small.shared, big.shared):  # all proportional to scans
        assert b_line.quantity == pytest.approx(100 * a_line.quantity), a_line.item
    startup = 4 * 30 * 5 / 60
    assert big.compute["Spot CPU"].quantity - startup == pytest.approx(
        100 * (small.compute["Spot CPU"].quantity - startup)
    )
    assert big.total("Spot CPU") == pytest.approx(
        sum(x.monthly_usd for x in (big.compute["Spot CPU"], big.head["Spot CPU"], *big.shared))
    )
    assert big.per_1k(big.total("Spot CPU")) < small.per_1k(small.total("Spot CPU"))  # fixed costs spread


def test_without_nodes_per_job_a_job_runs_on_the_cheapest_number_of_nodes(local_summary):
    """Each node adds its start-up; each node fewer lengthens the job, so the head's hours: the default count is
    the cheapest of all counts cluster.yaml allows, grows with the job, and keeps the job within the switch."""
    m, prices = cost.measure([local_summary]), cost.load_prices()
    auto = cost.estimate_at([10_000, 1_000_000], m, cost.Assumptions(scans_per_month=0), prices)
    max_workers = cost.cluster_max_workers("cpu")[0]
    assert max_workers == 16
    for report in auto:
        chosen = report.plan["Spot CPU"]["nodes_per_job"]
        batch = {
            n: cost.estimate(m, dataclasses.replace(report.assumptions, nodes_per_job=n), prices)
            for n in range(1, max_workers + 1)
        }
        bills = {n: r.compute["Spot CPU"].monthly_usd + r.head["Spot CPU"].monthly_usd for n, r in batch.items()}
        assert bills[chosen] == pytest.approx(min(bills.values())), (chosen, bills)
        assert report.plan["Spot CPU"]["job_hours"] <= cost.deadman_max_hours() == 12
    small, big = (r.plan["Spot CPU"]["nodes_per_job"] for r in auto)
    assert 1 <= small < big <= max_workers
    # The report says which --max-actors gives that count: nodes x the actors that fit a node.
    text = cost.format_report(auto)
    assert f"{small} @10k (--max-actors {small * 8})" in text and f"{big} @1M (--max-actors {big * 8})" in text
    # A job too long for the switch's lifetime at its cheapest count gets more nodes.
    slow = dataclasses.replace(auto[1].assumptions, jobs_per_month=1)
    plan = cost.estimate(m, slow, prices).plan["Spot CPU"]
    assert plan["nodes_per_job"] == max_workers or plan["job_hours"] <= 12


def test_actors_of_different_sizes_project_to_the_same_node_hours(tmp_path):
    """One 1-CPU actor, or one 2-CPU actor that is 2 x efficiency times faster: the same work on the target."""
    e2 = cost.PARALLEL_EFFICIENCY_2
    one = write_summary(_rows(actor_cpus=1.0), str(tmp_path / "one.parquet"))
    two = write_summary(_rows(actor_cpus=2.0, scale=1 / (2 * e2)), str(tmp_path / "two.parquet"))
    # An 8-CPU actor measured on a 2-core laptop had 2 cores' worth of threads, not 8.
    crowded = write_summary(_rows(actor_cpus=8.0, node_cpus=2, scale=1 / (2 * e2)), str(tmp_path / "8on2.parquet"))
    a, prices = cost.Assumptions(scans_per_month=10_000, nodes_per_job=1), cost.load_prices()
    hours = [cost.estimate(cost.measure([s]), a, prices).compute["Spot CPU"].quantity for s in (one, two, crowded)]
    assert hours[1] == pytest.approx(hours[0]) and hours[2] == pytest.approx(hours[0])
    # Wall seconds alone would have halved the bill for the 2-CPU run: CPU-seconds are what is projected.
    assert cost.measure([two]).cpu_seconds_per_scan > cost.measure([one]).cpu_seconds_per_scan


def test_smaller_actors_help_only_as_far_as_their_memory_lets_them(local_summary):
    """More, smaller actors waste less on threading, but a c7i.4xlarge holds only 32 GiB x 0.8 / 6 GB = 4 actors:
    16 one-thread actors would need 96 GB. (Why cluster.yaml's workers have 64 GiB for 16 vCPUs.)"""
    m, prices = cost.measure([local_summary]), cost.load_prices()
    hours = {
        k: cost.estimate(
            m,
            cost.Assumptions(scans_per_month=10_000, nodes_per_job=1, cpus_per_actor=k, cpu_instance="c7i.4xlarge"),
            prices,
        ).plan["Spot CPU"]["scan_node_hours_per_job"]
        for k in (1, 4, 8)
    }
    assert hours[4] < hours[8]  # 4 actors x 4 threads fit, and lose less to threading than 2 x 8
    # One-thread actors: memory-bound, 4 actors each taking the whole 57 s of one-thread work at 0.6 yield.
    assert hours[1] * 30 == pytest.approx(10_000 * (57.0 / 0.6 / 4) / 3600)
    assert hours[1] > hours[4]


def test_a_gpu_summary_prices_the_gpu_workers_from_gpu_seconds(tmp_path):
    rows = [{**r, "actor_gpus": 1.0, "actor_cpus": 2.0} for r in _rows()]
    gpu = cost.measure([write_summary(rows, str(tmp_path / "gpu.parquet"))])
    assert gpu.gpu_seconds_per_scan == pytest.approx(57.0)
    prices = cost.load_prices()
    report = cost.estimate(gpu, cost.Assumptions(scans_per_month=1000, nodes_per_job=1), prices, gpu_measured=gpu)
    assert report.compute["Spot GPU"].unit_price == pytest.approx(
        prices["ec2_spot_per_hour"]["g6.xlarge"] + 150 * prices["ebs_gp3_per_gb_month"] / 730
    )
    assert report.compute["Spot GPU"].quantity == pytest.approx(1000 * 57.0 / 3600 + 30 * 5 / 60)
    assert report.total("Spot GPU") is not None


def test_the_serve_endpoint_is_its_own_section_never_in_the_batch_total(local_summary):
    m, prices = cost.measure([local_summary]), cost.load_prices()
    report = cost.estimate(m, cost.Assumptions(scans_per_month=10_000), prices)
    head, replicas = report.serve
    assert head.quantity == cost.HOURS_PER_MONTH and "m7i.large" in head.item  # a small head, always on
    assert head.unit_price == pytest.approx(
        prices["ec2_on_demand_per_hour"]["m7i.large"] + 150 * prices["ebs_gp3_per_gb_month"] / 730
    )
    more = cost.estimate(m, cost.Assumptions(scans_per_month=10_000, serve_requests_per_month=2000), prices)
    assert more.serve[1].quantity > replicas.quantity and more.total("Spot CPU") == report.total("Spot CPU")
    assert report.serve_total() == pytest.approx(head.monthly_usd + replicas.monthly_usd)


def test_prices_are_dated_sourced_and_overridable(tmp_path):
    prices = cost.load_prices()
    assert prices["taken"] and prices["source"] and prices["currency"] == "USD"
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"ec2_spot_per_hour": {"c7i.4xlarge": 0.25}, "taken": "2027-01-01"}))
    merged = cost.load_prices(str(override))
    assert merged["ec2_spot_per_hour"]["c7i.4xlarge"] == 0.25
    assert merged["ec2_spot_per_hour"]["g6.xlarge"] == prices["ec2_spot_per_hour"]["g6.xlarge"]
    assert merged["taken"] == "2027-01-01"


def test_a_summary_without_the_measured_columns_is_an_error_unless_they_are_given(tmp_path):
    old = [{k: v for k, v in r.items() if k not in USAGE_COLUMNS} for r in _rows()]  # before jobs measured them
    summary = write_summary(old, str(tmp_path / "summary.parquet"))
    with pytest.raises(cost.CostInputError, match="--measured-actor-cpus"):
        cost.measure([summary])
    measured = cost.measure([summary], actor_cpus=1)
    with pytest.raises(cost.CostInputError, match="--mask-mb"):
        cost.estimate(measured, cost.Assumptions(scans_per_month=100), cost.load_prices())
    with pytest.raises(cost.CostInputError, match="--item-kb"):
        cost.estimate(measured, cost.Assumptions(scans_per_month=100, mask_mb=2.0, passport_kb=5.0), cost.load_prices())
    report = cost.estimate(
        measured, cost.Assumptions(scans_per_month=100, mask_mb=2.0, passport_kb=5.0, item_kb=3), cost.load_prices()
    )
    assert report.total("Spot CPU") > 0
    assert cli_main(["cost", "--summary", summary, "--scans-per-month", "100"]) == 2  # CostInputError -> exit 2


def test_a_summary_that_is_missing_or_not_parquet_is_one_line_naming_it(tmp_path, capsys):
    """The path a user types after a job (its summary, or the manifest by mistake): exit 2, not a traceback."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("scan_id,uri\na,/a.nii.gz\n")
    for summary, message in [
        (tmp_path / "nothing.parquet", "cannot read job summary {}: no job summary at {}"),
        (manifest, "{} is not a job summary (Parquet): "),
    ]:
        assert cli_main(["cost", "--summary", str(summary), "--scans-per-month", "100"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + message.format(summary, summary)) and err.count("\n") == 1, err


def test_cost_command_on_a_summary_in_s3_prints_both_volumes(moto_server, s3_bucket, capsys):
    summary = write_summary(_rows(), f"s3://{s3_bucket}/ct/_jobs/job-1/summary.parquet")
    assert cli_main(["cost", "--summary", summary, "--scans-per-month", "5000", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    m = cost.measure([summary])
    expected, million = cost.estimate_at([5000, 1_000_000], m, cost.Assumptions(scans_per_month=0), cost.load_prices())
    assert printed["measured"]["bytes_per_scan"] == pytest.approx(m.bytes_per_scan)
    assert printed["totals"]["Spot CPU"] == pytest.approx(expected.total("Spot CPU"))
    assert printed["per_1k_scans"]["Spot CPU"] == pytest.approx(expected.total("Spot CPU") / 5)
    (other,) = printed["other_volumes"]
    assert other["scans_per_month"] == 1_000_000 and other["totals"]["Spot CPU"] == pytest.approx(
        million.total("Spot CPU")
    )
    assert printed["serve"]["total"] == pytest.approx(expected.serve_total())


def test_cost_report_job_prints_the_table_and_exits_cleanly(local_summary):
    # Eight runs: reading Parquet through pyarrow's dataset layer made about half of the runs abort at exit
    # ("terminate called without an active exception") after printing the table.
    for _ in range(8):
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "jobs" / "cost_report.py"),
                "--summary",
                local_summary,
                "--scans-per-month",
                "10000",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in (
        "compute: Spot m7a.4xlarge",
        "compute: on-demand m7a.4xlarge",
        "batch head: on-demand m7i.large",
        "S3 Glacier IR",
        "DynamoDB writes",
        "egress",
        "CloudWatch Logs",
        "batch total with Spot CPU",
        "USD @10k",
        "USD @1M",
        "per 1k",
        "prices taken",
        "SERVE",
        "serve head: on-demand m7i.large",
        "serve total",
    ):
        assert text in out, text


def test_the_input_glacier_rule_is_priced_as_its_own_saving_line_by_line(local_summary):
    """jobs/setup_aws.py --input-glacier-days N: each month's inputs spend N days in Standard, then the rest of their
    retention in Glacier IR. The saving is (Standard - Glacier IR) x the GB-months moved, less the transitions; it is
    reported beside the batch total (the inputs are the user's bucket), never in it."""
    m, prices = cost.measure([local_summary]), cost.load_prices()
    plain = cost.estimate(m, cost.Assumptions(scans_per_month=10_000), prices)
    assert plain.inputs == [] and plain.input_saving() is None  # opt-in, like the rule
    a = cost.Assumptions(scans_per_month=10_000, input_glacier_days=90, input_mb=150)
    report = cost.estimate(m, a, prices)
    without, storage, transitions, retrievals = report.inputs
    for line in report.inputs:
        assert line.monthly_usd == pytest.approx(line.quantity * line.unit_price), line.item
    gb = 150 / 1024  # 150 MiB in GiB, as AWS bills
    standard, glacier = prices["s3_standard_per_gb_month"], prices["s3_glacier_ir_per_gb_month"]
    assert without.quantity == pytest.approx(10_000 * gb * 12) and without.unit_price == standard
    months_moved = 12 - 90 / (365 / 12)  # 9.04 of the 12 months kept
    assert storage.quantity == pytest.approx(10_000 * gb * months_moved)
    assert storage.unit_price == pytest.approx(glacier - standard) and storage.unit_price < 0
    assert transitions.quantity == pytest.approx(10) and transitions.unit_price == 0.02  # 10,000 objects
    assert retrievals.quantity == 0
    saving = 10_000 * gb * months_moved * (standard - glacier) - 10 * 0.02
    assert report.input_saving() == pytest.approx(saving) == pytest.approx(251.43, abs=0.01)
    assert report.total("Spot CPU") == pytest.approx(plain.total("Spot CPU"))  # not in the batch total
    text = cost.format_report(report)
    assert "INPUTS (your input bucket, not in the batch total)" in text and "input rule: saving a month" in text
    assert f"{saving:,.2f}" in text and "-$0.019" in text

    # A DICOM series of 300 slices: 300 transitions a scan; re-reads pay Glacier IR's retrieval.
    dicom = cost.estimate(
        m, dataclasses.replace(a, input_objects_per_scan=300, input_reread_fraction=0.1), prices
    ).inputs
    assert dicom[2].quantity == pytest.approx(10_000 * 300 / 1000) and dicom[2].monthly_usd == pytest.approx(60)
    assert dicom[3].quantity == pytest.approx(10_000 * gb * 0.1) and dicom[3].unit_price == 0.03
    # Objects at the rule's 128 KiB floor never move; inputs deleted before N days never move; the 90-day minimum.
    tiny = cost.estimate(m, dataclasses.replace(a, input_mb=0.1), prices)
    assert tiny.inputs[1].quantity == 0 and tiny.inputs[2].quantity == 0 and tiny.input_saving() == 0
    short = cost.estimate(m, dataclasses.replace(a, input_retention_months=2), prices)
    assert short.inputs[1].quantity == 0 and short.input_saving() == 0
    brief = cost.estimate(m, dataclasses.replace(a, input_glacier_days=30, input_retention_months=3), prices)
    assert brief.inputs[1].quantity == pytest.approx(10_000 * gb * 90 / (365 / 12))  # billed 90 days, kept 61
    with pytest.raises(cost.CostInputError, match="--input-mb"):
        cost.estimate(m, dataclasses.replace(a, input_mb=None), prices)
    assert (
        cli_main(
            ["cost", "--summary", local_summary, "--scans-per-month", "100", "--input-glacier-days", "90", "--json"]
        )
        == 2
    )


def test_the_defaults_are_the_shape_cluster_yaml_launches():
    """The report's default worker, GPU and head types are the ones a job on cluster.yaml gets (tests/test_cluster.py
    checks with Ray's own scheduler which worker type that is), with the documented 2-thread actors."""
    import yaml

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    d = cost.Assumptions(scans_per_month=1)
    head = config["available_node_types"][config["head_node_type"]]["node_config"]["InstanceType"]
    assert cost.cluster_instances() == {"head": head, "cpu": "m7a.4xlarge", "gpu": "g6.xlarge"}
    assert (
        (d.cpu_instance, d.gpu_instance, d.head_instance)
        == ("m7a.4xlarge", "g6.xlarge", "m7i.large")
        == (
            cost.cluster_instances()["cpu"],
            cost.cluster_instances()["gpu"],
            head,
        )
    )
    assert d.cpus_per_actor == 2 and d.vcpu_yield is None
    # The priced actors are deploy/README.md's CPU job: its 1.9-CPU actors run 2 threads, 8 to a 16-vCPU node.
    documented = re.search(
        r"--cpus-per-actor (\S+) --actor-resource spot_cpu=1", (REPO / "deploy" / "README.md").read_text()
    )
    assert documented, "deploy/README.md names the CPU job's actor size"
    cpus = float(documented.group(1))
    shape = plan_shape(BatchConfig(manifest="m", output="o", cpus_per_actor=cpus, actor_resources={"spot_cpu": 1}), {})
    assert shape.threads == d.cpus_per_actor and math.floor(16 / cpus) == math.floor(16 / d.cpus_per_actor) == 8
    assert cost.cluster_instances(REPO / "no-such.yaml") == cost.DEFAULT_INSTANCES


def test_vcpu_yield_follows_the_instances_threads_per_core(local_summary):
    """A 7th-generation AMD vCPU is a core (yield 1); an Intel vCPU a hyperthread (0.6): the same scans take 1/0.6
    times the node-seconds on a 16-vCPU m7i.4xlarge as on an m7a.4xlarge; --vcpu-yield overrides both."""
    m, prices = cost.measure([local_summary]), cost.load_prices()
    assert prices["instance_threads_per_core"]["m7a.4xlarge"] == 1
    assert prices["instance_threads_per_core"]["m7i.4xlarge"] == 2
    a = cost.Assumptions(scans_per_month=10_000, nodes_per_job=1)
    hours = {
        t: cost.estimate(m, dataclasses.replace(a, cpu_instance=t), prices).plan["Spot CPU"]["scan_node_hours_per_job"]
        for t in ("m7a.4xlarge", "m7i.4xlarge")
    }
    assert hours["m7i.4xlarge"] == pytest.approx(hours["m7a.4xlarge"] / cost.VCPU_YIELD_SMT)
    given = cost.estimate(m, dataclasses.replace(a, cpu_instance="m7i.4xlarge", vcpu_yield=1.0), prices)
    assert given.plan["Spot CPU"]["scan_node_hours_per_job"] == pytest.approx(hours["m7a.4xlarge"])
    assert "yield 1 (given)" in given.compute["Spot CPU"].basis
    assert "yield 1 (a vCPU is a core)" in cost.estimate(m, a, prices).compute["Spot CPU"].basis


def test_an_assumed_price_is_marked_in_its_line_and_explained_below(local_summary):
    m, prices = cost.measure([local_summary]), cost.load_prices()
    assert "ec2_spot_per_hour.m7a.4xlarge" in prices["assumed"]  # no Spot quote at hand for it
    report = cost.estimate(m, cost.Assumptions(scans_per_month=10_000), prices)
    assert "price (assumed)" in report.compute["Spot CPU"].basis
    assert "(assumed)" not in report.compute["on-demand CPU"].basis  # a list price
    assert "Price assumed, not listed: ec2_spot_per_hour.m7a.4xlarge" in cost.format_report(report)


# ------------------------------------------------------------------------- the projection, measured for real

_DRIVER = """
import sys
from ray_app.adapters.batch import BatchConfig, init_ray, run_batch
init_ray(num_cpus=3)  # a 2-CPU actor and the 0.5-CPU fetch and write tasks beside it
report = run_batch(BatchConfig(manifest=sys.argv[1], output=sys.argv[2], job_id=sys.argv[3],
                               cpus_per_actor=float(sys.argv[4]), min_actors=1, max_actors=1))
print("SUMMARY", report.summary_uri)
"""


@pytest.fixture(scope="module")
def realistic_weights(tmp_path_factory, phantom_weights) -> Path:
    """Random weights of the realistic 3 mm architecture (bench/make_random_weights.py), whose efficiency the
    report states: the phantom network is too small to use a second thread as well (0.65-0.71 per tile against
    0.82-0.87, bench/results/thread-scaling-*.json), so a phantom job would not test the stated figure."""
    root = tmp_path_factory.mktemp("realistic-weights")
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "make_random_weights.py"), str(root)],
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return root


@pytest.mark.slow
def test_the_real_job_measured_with_1_and_2_cpu_actors_projects_to_the_same_node_hours(realistic_weights, tmp_path):
    """The real batch job, twice on the same scan: one 1-CPU actor, then one 2-CPU actor (2 torch threads).
    Projected onto the default worker, both must give the node-hours the stated efficiency predicts."""
    import nibabel as nib

    from ray_app.demo.phantom import make_phantom

    # A 3 mm CT a little larger than one tile in two axes: 4 tiles of the realistic network, so the network's
    # forward passes (which threads speed up) dominate as in a full-size CT; one tile of a small scan is
    # dominated by single-threaded post-processing of the 118 classes' logits and gains nothing from a thread.
    scan = tmp_path / "ct.nii.gz"
    nib.save(make_phantom(11, shape=(133, 133, 112))[0], scan)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"scan_id,uri\nct-0,{scan}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOTALSEG_WEIGHTS_PATH": str(realistic_weights)}
    summaries = {}
    for cpus in (1, 2):  # each on a fresh local Ray, as a job on its own cluster
        done = subprocess.run(
            [sys.executable, "-c", _DRIVER, str(manifest), str(tmp_path / f"out-{cpus}"), f"job-{cpus}cpu", str(cpus)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (summaries[cpus],) = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("SUMMARY ")]

    rows = {cpus: [r for r in read_summary(uri) if r["status"] == "ok"] for cpus, uri in summaries.items()}
    assert all(len(r) == 1 for r in rows.values())
    assert {r["actor_cpus"] for r in rows[1]} == {1.0} and {r["actor_cpus"] for r in rows[2]} == {2.0}
    assert {r["node_cpus"] for r in rows[1] + rows[2]} == {len(os.sched_getaffinity(0))}
    assert all(
        r["objects_written"] == 2 and r["bytes_written"] > 0 and 0 < r["store_item_bytes"] < 4096
        for r in rows[1] + rows[2]
    )  # mask + passport; a compact item

    measured = {cpus: cost.measure([uri]) for cpus, uri in summaries.items()}
    a, prices = cost.Assumptions(scans_per_month=10_000, nodes_per_job=1), cost.load_prices()
    hours = {
        cpus: cost.estimate(m, a, prices).plan["Spot CPU"]["scan_node_hours_per_job"] for cpus, m in measured.items()
    }
    actor_efficiency = measured[1].actor_seconds / (2 * measured[2].actor_seconds)
    print(
        f"\nactor seconds per scan: 1 CPU {measured[1].actor_seconds:.2f}, 2 CPUs {measured[2].actor_seconds:.2f};"
        f" the actor's parallel efficiency at 2 threads {actor_efficiency:.2f} (stated:"
        f" {cost.PARALLEL_EFFICIENCY_2}); scan node-hours per job {hours[1]:.3f} vs {hours[2]:.3f}"
    )
    if actor_efficiency < 0.5:
        # Two threads slower than one: the cores were busy with other work (on a quiet machine a second thread
        # never makes the actor slower), so the run measured the load, not the job.
        pytest.skip(
            f"not a measurement: the 2-thread actor was slower than the 1-thread one ({actor_efficiency:.2f};"
            f" load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} CPUs)"
        )
    # The same node-hours within the efficiency's uncertainty: 30 % covers the spread of the measurements behind
    # the stated figure (0.82-0.90 from tile minima, medians and CPU-seconds, 0.82-0.84 for a whole CT:
    # bench/results/thread-scaling-*; 0.75 measured here on a quiet machine) and the load of a shared one.
    assert hours[2] == pytest.approx(hours[1], rel=0.30), (
        f"the actor's efficiency at 2 threads was {actor_efficiency:.2f} here (load {os.getloadavg()[0]:.1f}),"
        f" the report states {cost.PARALLEL_EFFICIENCY_2}"
    )


def test_the_figures_the_docs_quote_are_what_the_report_makes_of_the_committed_job_summaries():
    """README and bench/results quote `ray-app cost` with its defaults on the real job's summaries, which are
    committed (bench/results/cost-job/): recomputed here, so a change of defaults or prices cannot leave them stale
    (`python bench/cost_job.py --reproject` remakes cost.txt)."""
    kept = REPO / "bench" / "results" / "cost-job"
    clean = cost.measure([str(kept / "phantom-summary.parquet")])
    a = cost.Assumptions(
        scans_per_month=0,
        mask_mb=round(clean.large_bytes_per_scan / 1024**2, 3),
        passport_kb=round((clean.bytes_per_scan - clean.large_bytes_per_scan) / 1024, 1),
    )
    assert (a.mask_mb, a.passport_kb) == (0.323, 35.3)
    m = cost.measure([str(kept / "realistic-summary.parquet")])
    assert round(m.cpu_seconds_per_scan, 1) == 109.2
    small, big = cost.estimate_at([10_000, 1_000_000], m, a, cost.load_prices())
    figures = {
        "total": f"${small.total('Spot CPU'):,.2f}",
        "million": f"${big.total('Spot CPU'):,.2f}",
        "compute": f"${small.compute['Spot CPU'].monthly_usd:,.2f}",
        "head": f"${small.head['Spot CPU'].monthly_usd:,.2f}",
    }
    assert figures == {"total": "$14.77", "million": "$1,093.13", "compute": "$11.55", "head": "$2.10"}
    readme = (REPO / "README.md").read_text()
    assert all(f in readme for f in figures.values()), figures
    text = (REPO / "bench" / "results" / "cost.txt").read_text()
    default_run = text.split("$ ray-app cost")[1]  # the first projection: the defaults
    assert f"{small.total('Spot CPU'):,.2f}" in default_run and f"{big.total('Spot CPU'):,.2f}" in default_run
