"""Create or check the AWS resources the cluster needs, idempotently: run it as often as you like.

- the passport table (:func:`ray_app.storage.sinks.create_table`: on-demand, with its job index);
- the output bucket: default encryption, all public access blocked, and one lifecycle rule that moves large
  objects under the output prefix (the masks) to Glacier Instant Retrieval after 30 days;
- optionally (``input_glacier_days``) a second lifecycle rule, on the input bucket, that moves large objects under
  the input prefix (the scans, once segmented) to Glacier Instant Retrieval after that many days (opt-in: the
  inputs are usually someone else's data);
- optionally (``iam=True``) the head and worker roles and instance profiles that ``cluster.yaml`` names, with the
  policies in ``deploy/`` as inline policies, and the Spot service-linked role the head needs to launch Spot.

Every call goes through :func:`ray_app.storage.client`, so the endpoint and region come from the settings (and
``AWS_ENDPOINT_URL``) like everywhere else.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from ray_app import storage
from ray_app.storage.sinks import JOB_INDEX, LARGE_OBJECT_BYTES, create_table

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"  # the checkout's deploy/, beside the package
DATA_POLICY = "iam-policy.json"
HEAD_POLICY = "iam-head-policy.json"
HEAD_ROLE = "ray-app-head"
WORKER_ROLE = "ray-app-worker"
CLUSTER_NAME = "ray-app"

LIFECYCLE_RULE_ID = "ray-app-masks-to-glacier-ir"
#: Glacier IR bills every object as at least 128 KiB, so small passports and previews are better left in Standard;
#: masks are megabytes. (S3 lifecycle filters know prefixes, tags and sizes, not file names.) The job summary
#: counts the bytes written above this size apart, so the cost report prices each class.
MIN_TRANSITION_BYTES = LARGE_OBJECT_BYTES
TRANSITION_DAYS = 30
INPUT_LIFECYCLE_RULE_ID = "ray-app-inputs-to-glacier-ir"

_EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def render_policy(name: str, deploy_dir: Path = DEPLOY_DIR, **params: str) -> dict:
    """A policy template from ``deploy/`` with its ``${Name}`` placeholders filled; a missing one is an error."""
    text = (deploy_dir / name).read_text()
    return json.loads(string.Template(text).substitute(params))


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


# ------------------------------------------------------------------------------------------------- table


def ensure_table(name: str) -> dict:
    """Create the passport table if absent; report its billing mode, indexes and the job index's projection.

    A table made before the job index projected only keys, status and error code still works, but every write
    copies the whole item into the index: ``index_projection`` says ALL then (changing it means deleting and
    re-creating the index, which this does not do on its own).
    """
    create_table(name)
    table = storage.client("dynamodb").describe_table(TableName=name)["Table"]
    billing = (table.get("BillingModeSummary") or {}).get("BillingMode", "PROVISIONED")
    indexes = {i["IndexName"]: i for i in table.get("GlobalSecondaryIndexes", [])}
    projection = (indexes.get(JOB_INDEX) or {}).get("Projection", {})
    return {
        "name": name,
        "status": table["TableStatus"],
        "billing_mode": billing,
        "indexes": sorted(indexes),
        "index_projection": projection.get("ProjectionType"),
        "index_attributes": sorted(projection.get("NonKeyAttributes", [])),
        "ok": billing == "PAY_PER_REQUEST",
    }


# ------------------------------------------------------------------------------------------------ bucket


def lifecycle_rule(prefix: str, *, rule_id: str = LIFECYCLE_RULE_ID, days: int = TRANSITION_DAYS) -> dict:
    """Objects over :data:`MIN_TRANSITION_BYTES` under ``prefix`` to Glacier IR after ``days`` (the masks' rule by
    default; :func:`ensure_input_lifecycle` uses it with its own id and days for the input scans)."""
    size = {"ObjectSizeGreaterThan": MIN_TRANSITION_BYTES}
    rule_filter = {"And": {"Prefix": prefix, **size}} if prefix else size
    return {
        "ID": rule_id,
        "Status": "Enabled",
        "Filter": rule_filter,
        "Transitions": [{"Days": days, "StorageClass": "GLACIER_IR"}],
    }


def put_lifecycle_rule(bucket: str, rule: dict) -> list[str]:
    """Put ``rule`` on the bucket, replacing only the rule with its ID; other rules are kept. Returns the IDs."""
    s3 = storage.client("s3")
    try:
        rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ClientError as exc:
        if _code(exc) != "NoSuchLifecycleConfiguration":
            raise
        rules = []
    rules = [r for r in rules if r.get("ID") != rule["ID"]] + [rule]
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    return [r["ID"] for r in rules]


def ensure_input_lifecycle(bucket: str, prefix: str, days: int) -> dict:
    """Opt-in: the input scans under ``prefix`` to Glacier IR after ``days``. The bucket must exist (it is the
    scans' bucket, never created here). Returns the rule's id, days, class and size floor, so it can be priced."""
    if days < 1:
        raise ValueError(f"--input-glacier-days must be at least 1, not {days}")
    rule = lifecycle_rule(prefix, rule_id=INPUT_LIFECYCLE_RULE_ID, days=days)
    ids = put_lifecycle_rule(bucket, rule)
    return {
        "bucket": bucket,
        "prefix": prefix,
        "rule_id": INPUT_LIFECYCLE_RULE_ID,
        "days": days,
        "storage_class": "GLACIER_IR",
        "min_object_bytes": MIN_TRANSITION_BYTES,
        "lifecycle_rules": ids,
    }


def ensure_bucket(bucket: str, prefix: str = "", region: str | None = None, sse: str = "AES256") -> dict:
    """Create the output bucket if absent, then put encryption, the public access block and our lifecycle rule.

    Each put replaces the previous value, so a re-run changes nothing; other lifecycle rules on the bucket are kept.
    """
    s3 = storage.client("s3")
    created = False
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise
        kwargs = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **kwargs)
        created = True

    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    default = {"SSEAlgorithm": sse}
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": default, "BucketKeyEnabled": sse == "aws:kms"}]
        },
    )
    ids = put_lifecycle_rule(bucket, lifecycle_rule(prefix))
    return {"name": bucket, "created": created, "lifecycle_rules": ids, "sse": sse}


# --------------------------------------------------------------------------------------------------- IAM


@dataclass(frozen=True)
class IamParams:
    """The names the policy templates are filled with (see ``deploy/README.md``)."""

    input_bucket: str
    output_bucket: str
    output_prefix: str
    table: str
    region: str
    account_id: str
    cluster_name: str = CLUSTER_NAME
    head_role: str = HEAD_ROLE
    worker_role: str = WORKER_ROLE

    def template_values(self) -> dict[str, str]:
        return {
            "InputBucket": self.input_bucket,
            "OutputBucket": self.output_bucket,
            "OutputPrefix": self.output_prefix,
            "TableName": self.table,
            "Region": self.region,
            "AccountId": self.account_id,
            "ClusterName": self.cluster_name,
            "WorkerRole": self.worker_role,
        }


def account_id() -> str:
    return storage.client("sts").get_caller_identity()["Account"]


def _ensure_role(iam, role: str, policies: dict[str, dict]) -> None:
    try:
        iam.create_role(
            RoleName=role,
            AssumeRolePolicyDocument=json.dumps(_EC2_TRUST),
            Description="ray_app cluster node role (jobs/setup_aws.py)",
        )
    except ClientError as exc:
        if _code(exc) != "EntityAlreadyExists":
            raise
        iam.update_assume_role_policy(RoleName=role, PolicyDocument=json.dumps(_EC2_TRUST))
    for name, document in policies.items():
        iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=json.dumps(document))
    try:
        iam.create_instance_profile(InstanceProfileName=role)
    except ClientError as exc:
        if _code(exc) != "EntityAlreadyExists":
            raise
    profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
    if role not in {r["RoleName"] for r in profile["Roles"]}:
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)


def ensure_iam(params: IamParams, deploy_dir: Path = DEPLOY_DIR) -> dict:
    """Head role: data + autoscaler policies; worker role: data policy only; each with a same-named profile."""
    iam = storage.client("iam")
    values = params.template_values()
    data = render_policy(DATA_POLICY, deploy_dir, **values)
    head = render_policy(HEAD_POLICY, deploy_dir, **values)
    _ensure_role(iam, params.worker_role, {"ray-app-data": data})
    _ensure_role(iam, params.head_role, {"ray-app-data": data, "ray-app-autoscaler": head})
    try:
        iam.create_service_linked_role(AWSServiceName="spot.amazonaws.com")
    except ClientError as exc:  # AWS says InvalidInput ("... has been taken") when it exists already
        if _code(exc) not in ("InvalidInput", "EntityAlreadyExists"):
            raise
    return {"instance_profiles": [params.head_role, params.worker_role]}


def setup(
    table: str,
    bucket: str,
    prefix: str = "",
    region: str | None = None,
    sse: str = "AES256",
    iam: IamParams | None = None,
    input_lifecycle: tuple[str, str, int] | None = None,
) -> dict:
    """Everything above, in dependency order; returns what it found or made.

    ``input_lifecycle``: (input bucket, input prefix, days) for :func:`ensure_input_lifecycle`; refused when the
    output prefix lies under the input prefix in the same bucket (the rule would move the results too)."""
    if input_lifecycle is not None:
        in_bucket, in_prefix, _ = input_lifecycle
        if in_bucket == bucket and prefix.startswith(in_prefix):
            raise ValueError(
                f"the output s3://{bucket}/{prefix} lies under the input prefix "
                f"s3://{in_bucket}/{in_prefix}: its Glacier rule would move the results as well"
            )
    report = {"table": ensure_table(table), "bucket": ensure_bucket(bucket, prefix, region, sse)}
    if input_lifecycle is not None:
        report["input_lifecycle"] = ensure_input_lifecycle(*input_lifecycle)
    if iam is not None:
        report["iam"] = ensure_iam(iam)
    report["ok"] = report["table"]["ok"]
    return report
