"""``ray-app``: the command line. Each subcommand is a thin adapter over the core modules."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PHANTOM_WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "phantom_weights"


def _print_error(exc: BaseException) -> None:
    """One line on stderr, from the error model: ``error: <code>: <message>``."""
    from ray_app.core.errors import describe

    info = describe(exc)
    print(f"error: {info.code}: {info.message}", file=sys.stderr)


def _scan_id_from_path(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment local scans in this process (no Ray) into ``OUT/<scan_id>/``. Exit 1 when any scan failed, 2 when
    none could run (no weights, an unknown ROI, contradictory options)."""
    from ray_app.core import pipeline
    from ray_app.core.errors import RayAppError
    from ray_app.core.segmenter import Segmenter
    from ray_app.core.totalseg import task_spec
    from ray_app.settings import get_settings
    from ray_app.storage import results
    from ray_app.storage.keys import validate_scan_id
    from ray_app.storage.scans import load_scan
    from ray_app.storage.sinks import ArtifactSink

    if args.scan_id and len(args.scan_id) != len(args.scans):
        print("error: give one --scan-id per scan", file=sys.stderr)
        return 2
    settings = get_settings()
    fast = settings.fast if args.fast is None else args.fast
    try:
        segmenter = Segmenter.from_settings(
            settings, task_spec("total", fast=fast, roi_subset=args.roi_subset), device=args.device
        )
    except RayAppError as exc:  # no weights, an unknown ROI: no scan can run
        _print_error(exc)
        return 2
    sink = ArtifactSink(args.out, per_model=False)
    failed = 0
    for i, source in enumerate(args.scans):
        start = time.perf_counter()
        scan_id = args.scan_id[i] if args.scan_id else _scan_id_from_path(source)
        try:
            scan_id = validate_scan_id(scan_id)
            scan = load_scan(source, scan_id, settings)
            result = pipeline.segment_scan(
                segmenter, scan, settings=settings, timings={"read_s": time.perf_counter() - start}
            )
        except Exception as exc:  # noqa: BLE001 - reported per scan; the others still run
            result = pipeline.failure(str(scan_id), exc, segmenter.model_info, source_uri=source)
        doc = result.passport
        if result.ok:
            doc["timings"]["total_s"] = time.perf_counter() - start
            results.write_result(
                result,
                sink,
                None,
                "segment",
                label_map=segmenter.spec.output_labels,
                preview=args.preview,
                per_structure=args.per_structure,
            )
            present = sum(1 for s in doc["structures"].values() if s["present"])
            print(
                f"{scan_id}: ok, {present} structures present, {doc['timings']['total_s']:.1f} s"
                f" -> {Path(args.out) / scan_id}"
            )
        else:
            failed += 1
            print(f"{scan_id}: FAILED {doc['error']['code']}: {doc['error']['message']}")
    print(f"{len(args.scans) - failed} ok, {failed} failed")
    return 1 if failed else 0


def _at_least(low: float, kind: type = int, *, above: bool = False):
    """An argparse type: a number of ``kind`` that is ``low`` or more (``above``: more than ``low``)."""

    def parse(text: str):
        value = kind(text)
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {'more than' if above else 'at least'} {low:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passports", help="dynamodb://TABLE or sqlite:///PATH (default: OUTPUT/passports.sqlite)")
    p.add_argument("--table", help="DynamoDB table name (same as --passports dynamodb://TABLE)")
    p.add_argument("--job-id")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    _add_mode_options(p)
    p.add_argument("--force", action="store_true", help="redo scans that already have a passport")
    p.add_argument("--retry-failed", action="store_true", help="redo scans whose stored result is a failure")
    p.add_argument("--preview", action="store_true", help="also write preview.png per scan")
    _add_per_structure_option(p)
    fit = " (default: fitted to the CPUs and GPUs Ray sees)"
    p.add_argument("--min-actors", type=_at_least(1), default=None, help="segmentation actors always running" + fit)
    p.add_argument("--max-actors", type=_at_least(1), default=None, help="most segmentation actors at once" + fit)
    p.add_argument(
        "--cpus-per-actor",
        type=_at_least(0, float, above=True),
        default=None,
        help="CPUs (torch threads) per segmentation actor (default: on CPU one actor per node with the node's "
        "threads, vanilla TotalSegmentator's count, so the masks are vanilla's; fewer per actor, e.g. 1, is a "
        "throughput lever whose masks equal vanilla's run with that many threads)",
    )
    p.add_argument(
        "--gpus-per-actor",
        type=_at_least(0, float),
        default=None,
        help="fractions allowed, e.g. 0.5 (default: 1 with --device cuda, 0 with cpu)",
    )
    p.add_argument(
        "--actor-resource",
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="custom Ray resource per actor, e.g. spot_gpu=1 to pin actors to a node type",
    )
    p.add_argument(
        "--actor-memory-gb",
        type=_at_least(0, float, above=True),
        default=None,
        help="memory per segmentation actor, reserved with Ray and enforced as its heap limit: a scan "
        "that does not fit fails as out_of_memory instead of getting the worker OOM-killed",
    )
    p.add_argument(
        "--limit",
        type=_at_least(1),
        default=None,
        metavar="N",
        help="run only the first N scans of the manifest: a pilot whose measured figures price the month",
    )
    p.add_argument(
        "--max-task-retries",
        type=_at_least(0),
        default=3,
        help="times a scan is retried after the actor segmenting it died (Spot loss, OOM killer, crash); "
        "then it fails as worker_lost and the job goes on",
    )


def _add_per_structure_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--per-structure",
        action="store_true",
        help="also write segmentations.zip per scan: one binary <structure>.nii.gz per structure present "
        "(TotalSegmentator's default output layout)",
    )


def _add_mode_options(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="fast", action="store_true", default=None, help="3 mm model (default)")
    mode.add_argument("--normal", dest="fast", action="store_false", help="1.5 mm, five part models")
    p.add_argument("--roi-subset", nargs="+", default=None, metavar="STRUCTURE")


def batch_config(args: argparse.Namespace):
    from ray_app.adapters.batch import BatchConfig
    from ray_app.settings import get_settings

    settings = get_settings()
    passports = args.passports or (f"dynamodb://{args.table}" if args.table else None)
    resources = dict(_resource(r) for r in args.actor_resource) or None
    kwargs = {"job_id": args.job_id} if args.job_id else {}
    return BatchConfig(
        manifest=args.manifest,
        output=args.output,
        passports=passports,
        fast=settings.fast if args.fast is None else args.fast,
        device=args.device or settings.device,
        roi_subset=tuple(args.roi_subset) if args.roi_subset else None,
        force=args.force,
        retry_failed=args.retry_failed,
        preview=args.preview,
        per_structure=args.per_structure,
        min_actors=args.min_actors,
        max_actors=args.max_actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        actor_resources=resources,
        memory_per_actor=int(args.actor_memory_gb * 1024**3) if args.actor_memory_gb else None,
        max_task_retries=args.max_task_retries,
        limit=args.limit,
        **kwargs,
    )


def _resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    return name, float(amount or 1)


def cmd_batch(args: argparse.Namespace) -> int:
    """Run the Ray Data batch job. Exit 0 when every scan of the manifest has a good result (this run's or an
    earlier one's), 1 when any failed, was rejected or is skipped with an earlier failure, 2 when nothing could run
    (contradictory options, an unusable manifest, a failed preflight)."""
    from ray_app.adapters.batch import format_report, run_batch
    from ray_app.core.errors import InvalidRoiSubset, PreflightError
    from ray_app.settings import get_settings
    from ray_app.storage.manifest import ManifestError

    try:
        cfg = batch_config(args)
    except ValueError as exc:  # contradictory options: nothing started
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_batch(cfg, get_settings())
    except (ManifestError, PreflightError, InvalidRoiSubset) as exc:  # unusable manifest, destination, weights, ROI
        _print_error(exc)
        return 2
    print(format_report(report))
    from ray_app.ops.cloudwatch import ENV_NAMESPACE, publish_job
    from ray_app.storage.sinks import read_summary_table

    try:  # opt-in (RAY_APP_CLOUDWATCH_NAMESPACE): the failure-share alarm's numbers, from two summary columns
        if os.environ.get(ENV_NAMESPACE):
            publish_job(read_summary_table(report.summary_uri, ["status", "error_code"]).to_pylist())
    except Exception as exc:  # noqa: BLE001 - the job's results stand; only its metrics are missing
        print(f"warning: CloudWatch metrics not published: {exc}", file=sys.stderr)
    if report.succeeded:
        print(_projection(report.summary_uri))
    return report.exit_code


PROJECTED_SCANS_PER_MONTH = 10_000


def _projection(summary_uri: str) -> str:
    """Every job's closing lines: what it measured, and the month on AWS priced from that (a pilot with --limit
    prices 10,000 scans from 20); ``ray-app cost`` shows every line and assumption."""
    from ray_app.ops import cost

    try:
        m = cost.measure([summary_uri])
        report = cost.estimate(m, cost.Assumptions(scans_per_month=PROJECTED_SCANS_PER_MONTH), cost.load_prices())
    except cost.CostInputError as exc:
        return f"projection: none ({exc})"
    return (
        f"measured: {m.scans_ok} scans, {m.cpu_seconds_per_scan:.1f} CPU-s each ({m.actor_cpus:g}-CPU actor "
        f"{m.actor_seconds:.1f} s, fetch and write {m.task_seconds:.1f} s), {(m.bytes_per_scan or 0) / 1e6:.2f} "
        f"MB written\nprojected: {PROJECTED_SCANS_PER_MONTH:,} such scans a month on AWS, job-scoped with Spot "
        f"CPU: about ${report.total('Spot CPU'):,.2f} (every line: ray-app cost --summary {summary_uri} "
        f"--scans-per-month {PROJECTED_SCANS_PER_MONTH})"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Make phantom scans, then run the real batch pipeline on a local Ray with the project's made weights."""
    from ray_app.adapters.batch import format_report, run_batch
    from ray_app.demo.inputs import CORRUPT_CODE, CORRUPT_ID, make_demo_inputs

    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(PHANTOM_WEIGHTS)
    out = Path(args.out).resolve()
    manifest = make_demo_inputs(out / "inputs", count=args.scans)
    print(f"demo: {args.scans} phantom scans and a corrupt file in {out / 'inputs'}; manifest {manifest}")
    # --force: a second demo in the same folder runs again instead of skipping everything as done.
    batch_args = build_parser().parse_args(
        [
            "batch",
            "--manifest",
            str(manifest),
            "--output",
            str(out / "results"),
            "--max-actors",
            str(args.actors),
            "--preview",
            "--force",
        ]
    )
    report = run_batch(batch_config(batch_args))
    print(format_report(report))
    print(
        f"demo: masks, passports and previews under {out / 'results'}; passports in "
        f"{out / 'results' / 'passports.sqlite'}"
    )
    # The corrupt file failing is the demo working: success means exactly that failure and nothing else.
    outcome = {r["scan_id"]: (r["status"], r.get("error_code")) for r in report.rows}
    expected = {**{sid: ("ok", None) for sid in outcome if sid != CORRUPT_ID}, CORRUPT_ID: ("failed", CORRUPT_CODE)}
    if len(outcome) == args.scans + 1 and outcome == expected:
        print(
            f"demo: as intended: {args.scans} phantoms segmented, the corrupt file recorded as a failure "
            f"({CORRUPT_CODE}) while the job went on"
        )
        return 0
    print(
        "demo: NOT as intended: "
        + ", ".join(f"{sid} {st}{f' ({code})' if code else ''}" for sid, (st, code) in sorted(outcome.items())),
        file=sys.stderr,
    )
    return 1


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    """Start a local Ray (loopback only) and the Serve endpoint on HOST:PORT; block until Ctrl-C or SIGTERM."""
    import signal

    from ray_app.adapters.serve import build_app, load_token
    from ray_app.settings import get_settings

    try:
        load_token(get_settings())
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    # The workers inherit this process's environment (token, weights path, AWS settings): nothing secret is
    # copied into a runtime_env, where the dashboard would show it.
    ray.init(address="local", include_dashboard=False)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app({}), name="ray-app", route_prefix="/")
        print(f"serving on http://{args.host}:{args.port} (API docs at /docs); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def _absolute_paths(argv: list[str]) -> list[str]:
    """The job runs on the head in a directory of Ray's: local ``--manifest``/``--output`` paths are made absolute."""
    from ray_app import storage

    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--manifest", "--output") and storage.parse_uri(out[i + 1]).scheme == "local":
            out[i + 1] = os.path.abspath(out[i + 1])
    return out


def cmd_cluster_run(args: argparse.Namespace) -> int:
    """Preflight, then a job-scoped cluster: up, the batch job, down (``ray_app.ops.cluster``)."""
    from ray_app.core.errors import RayAppError
    from ray_app.ops import cluster, preflight
    from ray_app.settings import get_settings

    batch_argv = (
        _absolute_paths([a for a in args.batch_args if a != "--"])
        if args.local
        else [a for a in args.batch_args if a != "--"]
    )
    conf = cluster_config(args)
    try:
        cfg = batch_config(build_parser().parse_args(["batch", *batch_argv]))
        local = cluster.LocalLauncher(args.config) if args.local else None
        shape = preflight.complete_shape(local.node_types() if local else conf, cfg)
        if shape:  # the workers start from zero: the job is sized by cluster.yaml's node types, not what it finds
            batch_argv += shape
            cfg = batch_config(build_parser().parse_args(["batch", *batch_argv]))
            print(f"shape: {' '.join(shape)} (for cluster.yaml's workers; give these options to choose)", flush=True)
    except ValueError as exc:  # contradictory options
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"job {cfg.job_id}", flush=True)
    if not args.no_preflight:
        try:
            for line in preflight.run(conf, cfg, get_settings(), worker_role=None if args.local else args.worker_role):
                print(f"preflight: {line}", flush=True)
        except RayAppError as exc:
            _print_error(exc)
            return 2
    launcher: cluster.LocalLauncher | cluster.AwsLauncher
    if args.local:
        launcher = cluster.LocalLauncher(
            args.config, head_cpus=args.head_cpus, idle_s=args.idle_minutes * 60, max_lifetime_s=args.max_hours * 3600
        )
    else:
        launcher = cluster.AwsLauncher(conf if args.cloudwatch or args.cloudwatch_agent else args.config)
    return cluster.run_job(launcher, batch_argv, job_id=cfg.job_id, env=cluster.job_env(), keep=args.keep)


def cluster_config(args: argparse.Namespace) -> dict:
    """``--config`` as the launcher gets it: with the CloudWatch dashboard and alarms (``--cloudwatch``), and the
    CloudWatch agent on every node (``--cloudwatch-agent``, which implies them; its AMIs pinned through SSM with
    the caller's credentials)."""
    import yaml

    from ray_app.ops.cloudwatch import with_agent, with_cloudwatch

    conf = yaml.safe_load(Path(args.config).read_text())
    if args.cloudwatch or args.cloudwatch_agent:
        conf = with_cloudwatch(conf)
    if args.cloudwatch_agent:
        conf = with_agent(conf)
    return conf


def cmd_cluster_down(args: argparse.Namespace) -> int:
    """Remove every node of the cluster (``ray down``), e.g. after ``cluster run --keep``."""
    from ray_app.ops.cluster import AwsLauncher

    AwsLauncher(args.config).down()
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    """Price a finished job's measured per-scan figures for a monthly volume (see ``ray_app.ops.cost``)."""
    from ray_app.ops.cost import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment local scans in this process (no Ray)")
    p.add_argument("scans", nargs="+", metavar="SCAN", help="NIfTI file, DICOM folder or DICOM .zip")
    p.add_argument("--out", required=True)
    p.add_argument("--scan-id", action="append", help="ids for the scans, in order (default: file names)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--preview", action="store_true")
    _add_per_structure_option(p)
    _add_mode_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("batch", help="run the Ray Data batch job over a manifest")
    p.add_argument("--manifest", required=True, help="CSV, JSONL or Parquet; local path or s3://")
    p.add_argument("--output", required=True, help="local folder or s3://bucket/prefix")
    _add_batch_options(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("demo", help="offline demo: phantom scans through the real batch job on a local Ray")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--scans", type=int, default=4)
    p.add_argument("--actors", type=int, default=1)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the HTTP endpoint on a local Ray (needs RAY_APP_API_TOKEN)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    _add_cluster_parser(sub)

    from ray_app.ops.cost import add_arguments as add_cost_arguments

    p = sub.add_parser("cost", help="monthly AWS cost and cost per 1,000 scans from a finished job's summary")
    add_cost_arguments(p)
    p.set_defaults(func=cmd_cost)

    from ray_app.ops import report

    p = sub.add_parser("report", help="an HTML page from a job summary: statuses, stage seconds, organ volumes")
    report.add_arguments(p)
    p.set_defaults(func=report.run)

    from ray_app.ops import export

    p = sub.add_parser("export", help="a job's passports as one Parquet or CSV table (one row per scan)")
    export.add_arguments(p)
    p.set_defaults(func=export.run)

    from ray_app.ops import watch

    p = sub.add_parser("status", help="a job's progress from its passports: counts, error codes, rate, ETA")
    watch.add_arguments(p)
    p.set_defaults(func=watch.run)
    return parser


def _add_cluster_parser(sub) -> None:
    from ray_app.ops.aws_setup import WORKER_ROLE
    from ray_app.ops.cluster import CLUSTER_YAML

    cluster = sub.add_parser("cluster", help="job-scoped clusters: up, one batch job, down").add_subparsers(
        dest="cluster_command", required=True
    )
    p = cluster.add_parser(
        "run",
        help="preflight, start the cluster, run the batch job on it, remove every node",
        description="Everything after -- is `ray-app batch`'s options, e.g. "
        "ray-app cluster run -- --manifest s3://in/m.csv --output s3://out/ct/ "
        "--table passports --limit 20",
    )
    p.add_argument("--config", default=str(CLUSTER_YAML), help="the cluster.yaml to launch (default: the checkout's)")
    p.add_argument(
        "--local", action="store_true", help="rehearse on this machine: Ray's fake multinode provider stands in for EC2"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the cluster up after the job (the dead-man's switch "
        "still ends it once idle); `ray-app cluster down` removes it",
    )
    p.add_argument("--worker-role", default=WORKER_ROLE, help="role whose policy must allow writing the output")
    p.add_argument("--no-preflight", action="store_true", help="skip the checks before the cluster starts")
    p.add_argument(
        "--cloudwatch",
        action="store_true",
        help="add deploy/cloudwatch/provider.yaml: the dashboard "
        "and alarms through Ray's launcher (see deploy/cloudwatch/README.md before relying on it)",
    )
    p.add_argument(
        "--cloudwatch-agent",
        action="store_true",
        help="--cloudwatch plus the CloudWatch agent on every node (logs and Prometheus metrics to CloudWatch; "
        "pins each node's AMI through SSM; deploy/cloudwatch/README.md)",
    )
    p.add_argument(
        "--idle-minutes",
        type=float,
        default=15.0,
        help="--local: the dead-man's switch's idle limit (on AWS: cluster.yaml's head_start_ray_commands)",
    )
    p.add_argument("--max-hours", type=float, default=12.0, help="--local: the head's maximum lifetime (likewise)")
    p.add_argument(
        "--head-cpus",
        type=int,
        default=0,
        help="--local: CPUs the head offers to fetch and write tasks (cluster.yaml's head: 0)",
    )
    p.add_argument("batch_args", nargs=argparse.REMAINDER, help="-- then the batch job's options")
    p.set_defaults(func=cmd_cluster_run)
    p = cluster.add_parser("down", help="remove every node of the cluster (ray down)")
    p.add_argument("--config", default=str(CLUSTER_YAML))
    p.set_defaults(func=cmd_cluster_down)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
