"""Create or check the AWS resources for the cluster; safe to run again (it converges, it never duplicates).

    python jobs/setup_aws.py --table passports --output s3://my-results/ct/ \
        [--iam --input s3://my-scans --cluster-name ray-app] [--input s3://my-scans/ct/ --input-glacier-days 90]

Prints what it found or made as JSON; exits 1 when a check fails (e.g. the table exists in provisioned mode).
Uses the ordinary AWS credential chain; the region and endpoint come from RAY_APP_AWS_REGION, else
AWS_REGION / the profile (ray_app.storage.aws_region); the endpoint from RAY_APP_AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, for an uninstalled one

from ray_app import storage  # noqa: E402
from ray_app.ops import aws_setup  # noqa: E402
from ray_app.settings import get_settings  # noqa: E402


def _bucket_and_prefix(uri: str) -> tuple[str, str]:
    loc = storage.parse_uri(uri)
    if loc.scheme != "s3":
        raise SystemExit(f"error: {uri!r} is not an s3:// URI")
    prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
    return loc.bucket, prefix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help="DynamoDB passport table")
    parser.add_argument("--output", required=True, help="s3://bucket/prefix/ the batch job writes results to")
    parser.add_argument("--iam", action="store_true", help="also create the head/worker roles and profiles")
    parser.add_argument("--input", help="s3://bucket of the input scans (needed with --iam)")
    parser.add_argument(
        "--input-glacier-days",
        type=int,
        metavar="N",
        help="opt-in: move objects over 128 KiB under --input's prefix to Glacier Instant Retrieval "
        "N days after upload (a lifecycle rule on the input bucket; its other rules are kept)",
    )
    parser.add_argument("--cluster-name", default=aws_setup.CLUSTER_NAME, help="cluster_name in cluster.yaml")
    parser.add_argument("--head-role", default=aws_setup.HEAD_ROLE)
    parser.add_argument("--worker-role", default=aws_setup.WORKER_ROLE)
    args = parser.parse_args(argv)

    settings = get_settings()
    bucket, prefix = _bucket_and_prefix(args.output)
    iam = None
    if args.iam:
        if not args.input:
            parser.error("--iam needs --input s3://INPUT_BUCKET")
        iam = aws_setup.IamParams(
            input_bucket=_bucket_and_prefix(args.input)[0],
            output_bucket=bucket,
            output_prefix=prefix,
            table=args.table,
            region=storage.aws_region()[0],
            account_id=aws_setup.account_id(),
            cluster_name=args.cluster_name,
            head_role=args.head_role,
            worker_role=args.worker_role,
        )
    input_lifecycle = None
    if args.input_glacier_days is not None:
        if not args.input:
            parser.error("--input-glacier-days needs --input s3://INPUT_BUCKET/PREFIX")
        if args.input_glacier_days < 1:
            parser.error("--input-glacier-days must be at least 1")
        input_lifecycle = (*_bucket_and_prefix(args.input), args.input_glacier_days)
    try:
        report = aws_setup.setup(
            args.table,
            bucket,
            prefix,
            region=storage.aws_region()[0],
            sse=settings.s3_sse,
            iam=iam,
            input_lifecycle=input_lifecycle,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
