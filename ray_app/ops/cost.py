"""What the batch job costs on AWS per month and per 1,000 scans, from a finished job's measured numbers.

Measured (from the job summary and the objects it names): seconds per scan (``total_s`` of the scans that
succeeded), mask and passport sizes, result objects per scan. Priced with ``ray_app/data/prices.json`` (dated,
sourced; any key can be overridden by a file). Assumed, and printed as such: actors per node, retention, egress
share, log volume, per-job node overhead.

Every line is ``quantity x unit price``; :func:`estimate` returns the lines so the arithmetic can be checked.
Steady state means a month in which ``retention_months`` months of results are stored: the newest month's
masks in S3 Standard, the older ones in Glacier Instant Retrieval (the bucket's lifecycle rule), passports in
Standard throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

PRICES_FILE = Path(__file__).resolve().parent.parent / "data" / "prices.json"
HOURS_PER_MONTH = 730  # AWS's own convention for monthly estimates
GB = 1024**3  # AWS bills storage and transfer per GiB ("GB")
MAX_SIZED_OBJECTS = 200  # HEAD at most this many results per summary to measure sizes


class CostInputError(ValueError):
    """A figure the report needs is neither measurable from the summary nor given."""


# ---------------------------------------------------------------------------------------------- prices


def load_prices(override: str | None = None) -> dict:
    """The default price table, with the keys of ``override`` (a local or s3:// JSON file) replacing its own;
    per-instance tables are merged so one instance price can be changed alone."""
    from ray_app import storage

    prices = json.loads(PRICES_FILE.read_text())
    if override:
        for key, value in json.loads(storage.read_bytes(override)).items():
            if isinstance(value, dict) and isinstance(prices.get(key), dict):
                prices[key] = {**prices[key], **value}
            else:
                prices[key] = value
    return prices


def _price(prices: dict, table: str, instance: str) -> float:
    try:
        return float(prices[table][instance])
    except KeyError:
        raise CostInputError(f"no {table} price for {instance!r}; add it with --prices FILE") from None


# -------------------------------------------------------------------------------------------- measured


@dataclass(frozen=True)
class Measured:
    """What a finished job measured, averaged over the scans that succeeded."""

    summaries: tuple[str, ...]
    scans_ok: int
    seconds_per_scan: float
    segment_seconds: float
    mask_bytes: float | None
    passport_bytes: float | None
    objects_per_scan: float


def _size(uri: str) -> int | None:
    from botocore.exceptions import ClientError

    from ray_app import storage

    try:
        loc = storage.parse_uri(uri)
        if loc.scheme == "local":
            return os.path.getsize(loc.path)
        return storage.client("s3").head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"]
    except (OSError, ClientError, storage.UnsupportedUri):  # e.g. deleted since the job ran: not sized
        return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure(summary_uris: list[str]) -> Measured:
    """Read job summaries (Parquet, local or s3://) and size the masks and passports they name."""
    from ray_app.sinks import read_summary

    rows = [row for uri in summary_uris for row in read_summary(uri)]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("total_s") is not None]
    if not ok:
        raise CostInputError(f"no successful scans with timings in {', '.join(summary_uris)}")
    masks = [s for s in (_size(r["mask_uri"]) for r in ok[:MAX_SIZED_OBJECTS] if r.get("mask_uri")) if s]
    passports = [s for s in (_size(r["passport_uri"]) for r in ok[:MAX_SIZED_OBJECTS] if r.get("passport_uri")) if s]
    return Measured(
        summaries=tuple(summary_uris),
        scans_ok=len(ok),
        seconds_per_scan=_mean([r["total_s"] for r in ok]),
        segment_seconds=_mean([r["segment_s"] for r in ok if r.get("segment_s") is not None]) or 0.0,
        mask_bytes=_mean(masks),
        passport_bytes=_mean(passports),
        objects_per_scan=_mean([sum(1 for k in ("mask_uri", "passport_uri") if r.get(k)) for r in ok]),
    )


# ------------------------------------------------------------------------------------------ assumptions


@dataclass(frozen=True)
class Assumptions:
    """The figures a summary cannot measure. Defaults follow ``cluster.yaml``."""

    scans_per_month: int
    cpu_instance: str = "c7i.4xlarge"
    gpu_instance: str = "g6.xlarge"
    head_instance: str = "m7i.xlarge"
    cpu_actors_per_node: int = 2  # 16 vCPU, --cpus-per-actor 8
    gpu_actors_per_node: int = 1
    head_hours: float = HOURS_PER_MONTH  # the head is always on
    ebs_gb_per_node: float = 150
    jobs_per_month: int = 30
    node_overhead_minutes: float = 10  # per job: boot and setup, then idle_timeout_minutes before scale-down
    retention_months: int = 12
    egress_fraction: float = 1.0  # share of masks downloaded out of AWS once
    log_kb_per_scan: float = 10  # to CloudWatch Logs, when a log agent ships them
    mask_mb: float | None = None  # overrides the measured mask size
    passport_kb: float | None = None  # overrides the measured passport size


# ---------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class LineItem:
    item: str
    quantity: float
    unit: str
    unit_price: float
    basis: str

    @property
    def monthly_usd(self) -> float:
        return self.quantity * self.unit_price


@dataclass
class CostReport:
    assumptions: Assumptions
    measured: Measured
    gpu_measured: Measured | None
    prices: dict
    compute: dict[str, LineItem | None]  # alternatives: one of them runs the scans
    shared: list[LineItem]  # paid whichever compute runs them

    def per_1k(self, usd: float) -> float:
        return usd / self.assumptions.scans_per_month * 1000

    def total(self, option: str) -> float | None:
        line = self.compute[option]
        return None if line is None else line.monthly_usd + sum(s.monthly_usd for s in self.shared)


def _node_hour_price(prices: dict, table: str, instance: str, a: Assumptions) -> float:
    """Instance price plus its root volume's, per hour."""
    return _price(prices, table, instance) + a.ebs_gb_per_node * prices["ebs_gp3_per_gb_month"] / HOURS_PER_MONTH


def _compute_line(label: str, m: Measured | None, instance: str, actors: int, table: str, prices: dict,
                  a: Assumptions) -> LineItem | None:
    if m is None:
        return None
    scan_hours = a.scans_per_month * m.seconds_per_scan / 3600 / actors
    overhead_hours = a.jobs_per_month * a.node_overhead_minutes / 60
    return LineItem(
        f"compute: {label} {instance}", scan_hours + overhead_hours, "node-h",
        _node_hour_price(prices, table, instance, a),
        f"{a.scans_per_month} scans x {m.seconds_per_scan:.1f} s / {actors} actors per node"
        f" + {a.jobs_per_month} jobs x {a.node_overhead_minutes:g} min; price incl. {a.ebs_gb_per_node:g} GB gp3")


def estimate(measured: Measured, assumptions: Assumptions, prices: dict,
             gpu_measured: Measured | None = None) -> CostReport:
    """All line items for ``assumptions.scans_per_month``."""
    a, p, n = assumptions, prices, assumptions.scans_per_month
    if n <= 0 or a.cpu_actors_per_node <= 0 or a.gpu_actors_per_node <= 0 or a.retention_months < 1:
        raise CostInputError("scans per month and actors per node must be positive, retention at least 1 month")
    mask_bytes = a.mask_mb * 1024**2 if a.mask_mb is not None else measured.mask_bytes
    passport_bytes = a.passport_kb * 1024 if a.passport_kb is not None else measured.passport_bytes
    if mask_bytes is None:
        raise CostInputError("mask size unknown: the summary names no readable masks; pass --mask-mb")
    if passport_bytes is None:
        raise CostInputError("passport size unknown: the summary names no readable passports; pass --passport-kb")
    mask_gb, passport_gb = mask_bytes / GB, passport_bytes / GB
    item_kb = math.ceil(passport_bytes / 1024)  # DynamoDB bills writes per started KB, reads per started 4 KB
    retention = a.retention_months
    size_basis = "measured" if a.mask_mb is None else "given"

    compute = {
        "Spot CPU": _compute_line("Spot", measured, a.cpu_instance, a.cpu_actors_per_node, "ec2_spot_per_hour", p, a),
        "on-demand CPU": _compute_line("on-demand", measured, a.cpu_instance, a.cpu_actors_per_node,
                                       "ec2_on_demand_per_hour", p, a),
        "Spot GPU": _compute_line("Spot", gpu_measured, a.gpu_instance, a.gpu_actors_per_node, "ec2_spot_per_hour",
                                  p, a),
        "on-demand GPU": _compute_line("on-demand", gpu_measured, a.gpu_instance, a.gpu_actors_per_node,
                                       "ec2_on_demand_per_hour", p, a),
    }
    shared = [
        LineItem(f"head node: on-demand {a.head_instance}", a.head_hours, "h",
                 _node_hour_price(p, "ec2_on_demand_per_hour", a.head_instance, a), "always on, incl. its gp3 volume"),
        LineItem("S3 Standard: newest month's masks + all passports", n * (mask_gb + retention * passport_gb),
                 "GB-month", p["s3_standard_per_gb_month"],
                 f"{size_basis} mask {mask_bytes / 1024**2:.2f} MB, passport {passport_bytes / 1024:.1f} KB;"
                 f" {retention} months kept"),
        LineItem("S3 Glacier IR: older masks", n * mask_gb * (retention - 1), "GB-month",
                 p["s3_glacier_ir_per_gb_month"], f"lifecycle rule after 30 days; {retention - 1} months' masks"),
        LineItem("S3 PUT: results", n * measured.objects_per_scan / 1000, "1k requests", p["s3_put_per_1000"],
                 f"measured {measured.objects_per_scan:.1f} objects per scan"),
        LineItem("S3 GET: inputs", n * 2 / 1000, "1k requests", p["s3_get_per_1000"], "HEAD + GET per scan"),
        LineItem("S3 lifecycle transitions", n / 1000, "1k requests", p["s3_glacier_ir_transition_per_1000"],
                 "one mask per scan"),
        LineItem("DynamoDB writes (table + job index)", n * 2 * item_kb / 1e6, "M write units",
                 p["dynamodb_write_per_million"], f"{item_kb} KB passport item, written to the table and its GSI"),
        LineItem("DynamoDB reads (resume check)", n * math.ceil(item_kb / 4) / 1e6, "M read units",
                 p["dynamodb_read_per_million"], "one strongly consistent GetItem per scan"),
        LineItem("DynamoDB storage", n * retention * 2 * item_kb * 1024 / GB, "GB-month",
                 p["dynamodb_storage_per_gb_month"], f"table + GSI copy, {retention} months kept"),
        LineItem("egress to the internet", n * mask_gb * a.egress_fraction, "GB", p["egress_internet_per_gb"],
                 f"{a.egress_fraction:g} of masks downloaded once (assumed)"),
        LineItem("CloudWatch Logs ingestion", n * a.log_kb_per_scan * 1024 / GB, "GB",
                 p["cloudwatch_logs_ingest_per_gb"], f"{a.log_kb_per_scan:g} KB per scan (assumed)"),
        LineItem("CloudWatch Logs storage", n * a.log_kb_per_scan * 1024 / GB * retention, "GB-month",
                 p["cloudwatch_logs_storage_per_gb_month"], f"{retention} months kept"),
    ]
    return CostReport(a, measured, gpu_measured, prices, compute, shared)


# ------------------------------------------------------------------------------------------------ output


def _row(line: LineItem, report: CostReport) -> str:
    qty = f"{line.quantity:,.3f} {line.unit}"
    return (f"{line.item:<44} {qty:>22} {'$' + format(line.unit_price, '.5g'):>10} "
            f"{line.monthly_usd:>12,.2f} {report.per_1k(line.monthly_usd):>10,.3f}  {line.basis}")


def format_report(report: CostReport) -> str:
    """The table a user reads: compute alternatives, shared lines, then one total per alternative."""
    a, m, p = report.assumptions, report.measured, report.prices
    head = f"{'line item':<44} {'quantity':>22} {'price':>10} {'USD/month':>12} {'per 1k':>10}  basis"
    out = [
        f"Cost estimate: {a.scans_per_month:,} scans/month, {p.get('region', '?')}, prices taken {p.get('taken', '?')}",
        (f"measured: {m.scans_ok} ok scans in {', '.join(m.summaries)}: {m.seconds_per_scan:.1f} s/scan total"
         f" ({m.segment_seconds:.1f} s segmentation)"),
    ]
    g = report.gpu_measured
    if g is not None:
        out.append(f"measured (GPU): {g.scans_ok} ok scans in {', '.join(g.summaries)}:"
                   f" {g.seconds_per_scan:.1f} s/scan")
    out += ["", head, "-" * len(head)]
    for option, line in report.compute.items():
        out.append(_row(line, report) if line else f"compute: {option:<35} not measured (pass a summary of such a run)")
    out.append("-" * len(head))
    out += [_row(line, report) for line in report.shared]
    out.append("-" * len(head))
    for option in report.compute:
        total = report.total(option)
        if total is not None:
            out.append(f"{'total with ' + option:<44} {'':>22} {'':>10} {total:>12,.2f} {report.per_1k(total):>10,.3f}")
    out.append(f"'per 1k': USD per 1,000 scans. Prices: {p.get('source', '')}")
    return "\n".join(out)


def report_dict(report: CostReport) -> dict:
    """The same figures as JSON-ready data."""
    def line(item: LineItem | None) -> dict | None:
        if item is None:
            return None
        return {**asdict(item), "monthly_usd": item.monthly_usd, "per_1k_scans_usd": report.per_1k(item.monthly_usd)}

    return {
        "assumptions": asdict(report.assumptions),
        "measured": asdict(report.measured),
        "gpu_measured": asdict(report.gpu_measured) if report.gpu_measured else None,
        "prices": {k: report.prices.get(k) for k in ("taken", "region", "currency", "source")},
        "compute": {k: line(v) for k, v in report.compute.items()},
        "shared": [line(s) for s in report.shared],
        "totals": {k: report.total(k) for k in report.compute},
        "per_1k_scans": {k: (None if t is None else report.per_1k(t))
                         for k, t in ((k, report.total(k)) for k in report.compute)},
    }


# ----------------------------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Assumptions(scans_per_month=0)
    p.add_argument("--summary", action="append", required=True, metavar="URI",
                   help="summary.parquet of a finished CPU run (repeatable)")
    p.add_argument("--gpu-summary", action="append", default=[], metavar="URI",
                   help="summary.parquet of a run on the GPU workers (repeatable); without it GPU is not priced")
    p.add_argument("--scans-per-month", type=int, required=True)
    p.add_argument("--prices", help=f"JSON overriding keys of {PRICES_FILE.name} (local or s3://)")
    p.add_argument("--mask-mb", type=float, help="mask size instead of the measured one")
    p.add_argument("--passport-kb", type=float, help="passport size instead of the measured one")
    for name in ("cpu_instance", "gpu_instance", "head_instance"):
        p.add_argument("--" + name.replace("_", "-"), default=getattr(d, name))
    for name in ("cpu_actors_per_node", "gpu_actors_per_node", "jobs_per_month", "retention_months"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("head_hours", "ebs_gb_per_node", "node_overhead_minutes", "egress_fraction", "log_kb_per_scan"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    fields = Assumptions.__dataclass_fields__
    assumptions = Assumptions(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        report = estimate(measure(args.summary), assumptions, load_prices(args.prices),
                          measure(args.gpu_summary) if args.gpu_summary else None)
    except CostInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report_dict(report), indent=1) if args.json else format_report(report))
    return 0
