"""``jobs/setup_aws.py`` against a moto server (run twice: it converges), and the IAM policies checked as data."""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from ray_app.ops import aws_setup

REPO = Path(__file__).resolve().parent.parent

PARAMS = aws_setup.IamParams(
    input_bucket="scan-inputs",
    output_bucket="scan-results",
    output_prefix="ct/",
    table="passports",
    region="us-east-1",
    account_id="123456789012",
)


def run_setup(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "setup_aws.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_setup_job_run_twice_leaves_one_table_one_rule_encryption_and_no_public_access(moto_server):
    suffix = uuid.uuid4().hex[:8]
    table, bucket = f"passports-{suffix}", f"results-{suffix}"
    args = ("--table", table, "--output", f"s3://{bucket}/ct", "--iam", "--input", f"s3://scans-{suffix}")
    first, second = run_setup(*args), run_setup(*args)
    assert first["bucket"]["created"] is True and second["bucket"]["created"] is False
    assert first["ok"] and second["ok"]
    # The job index copies keys, status and error code, not the whole item (what DynamoDB bills per write).
    assert second["table"]["index_projection"] == "INCLUDE"
    assert second["table"]["index_attributes"] == ["error_code", "status"]

    ddb, s3, iam = (boto3.client(s) for s in ("dynamodb", "s3", "iam"))
    assert [t for t in ddb.list_tables()["TableNames"] if t == table] == [table]
    described = ddb.describe_table(TableName=table)["Table"]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert [i["IndexName"] for i in described["GlobalSecondaryIndexes"]] == ["job_id-index"]

    (rule,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["ID"] == aws_setup.LIFECYCLE_RULE_ID and rule["Status"] == "Enabled"
    assert rule["Transitions"] == [{"Days": 30, "StorageClass": "GLACIER_IR"}]
    assert rule["Filter"]["And"]["Prefix"] == "ct/"
    (sse,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert sse["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert block == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }

    profiles = {
        p["InstanceProfileName"]: [r["RoleName"] for r in p["Roles"]]
        for p in iam.list_instance_profiles()["InstanceProfiles"]
    }
    assert profiles[aws_setup.HEAD_ROLE] == [aws_setup.HEAD_ROLE]
    assert profiles[aws_setup.WORKER_ROLE] == [aws_setup.WORKER_ROLE]
    assert sorted(iam.list_role_policies(RoleName=aws_setup.HEAD_ROLE)["PolicyNames"]) == [
        "ray-app-autoscaler",
        "ray-app-data",
    ]
    assert iam.list_role_policies(RoleName=aws_setup.WORKER_ROLE)["PolicyNames"] == ["ray-app-data"]
    data = iam.get_role_policy(RoleName=aws_setup.WORKER_ROLE, PolicyName="ray-app-data")["PolicyDocument"]
    assert f"arn:aws:s3:::{bucket}/ct/*" in json.dumps(data)


def test_setup_keeps_other_lifecycle_rules_and_replaces_only_its_own(s3_bucket, moto_server):
    s3 = boto3.client("s3")
    other = {"ID": "someone-elses", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 1}}
    s3.put_bucket_lifecycle_configuration(Bucket=s3_bucket, LifecycleConfiguration={"Rules": [other]})
    aws_setup.ensure_bucket(s3_bucket, "ct/")
    aws_setup.ensure_bucket(s3_bucket, "ct/")
    rules = s3.get_bucket_lifecycle_configuration(Bucket=s3_bucket)["Rules"]
    assert sorted(r["ID"] for r in rules) == sorted(["someone-elses", aws_setup.LIFECYCLE_RULE_ID])


def test_input_glacier_rule_is_opt_in_added_once_and_keeps_the_buckets_other_rules(moto_server):
    suffix = uuid.uuid4().hex[:8]
    s3 = boto3.client("s3")
    inputs, results = f"scans-{suffix}", f"results-{suffix}"
    s3.create_bucket(Bucket=inputs)
    other = {"ID": "someone-elses", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 1}}
    s3.put_bucket_lifecycle_configuration(Bucket=inputs, LifecycleConfiguration={"Rules": [other]})
    base = ("--table", f"passports-{suffix}", "--output", f"s3://{results}/ct")

    assert "input_lifecycle" not in run_setup(*base, "--input", f"s3://{inputs}/ct")  # not without the option
    assert [r["ID"] for r in s3.get_bucket_lifecycle_configuration(Bucket=inputs)["Rules"]] == ["someone-elses"]

    args = (*base, "--input", f"s3://{inputs}/ct", "--input-glacier-days", "90")
    first, second = run_setup(*args), run_setup(*args)
    assert first["input_lifecycle"] == second["input_lifecycle"]
    assert {k: first["input_lifecycle"][k] for k in ("rule_id", "days", "storage_class", "prefix")} == {
        "rule_id": aws_setup.INPUT_LIFECYCLE_RULE_ID,
        "days": 90,
        "storage_class": "GLACIER_IR",
        "prefix": "ct/",
    }
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=inputs)["Rules"]}
    assert sorted(rules) == sorted(["someone-elses", aws_setup.INPUT_LIFECYCLE_RULE_ID])  # once, other kept
    assert rules["someone-elses"]["Expiration"] == {"Days": 1}
    mine = rules[aws_setup.INPUT_LIFECYCLE_RULE_ID]
    assert mine["Transitions"] == [{"Days": 90, "StorageClass": "GLACIER_IR"}]
    # moto 5.2 returns an And filter without its size (the rule as sent: test_lifecycle_rule_moves_only_large...)
    assert mine["Filter"]["And"]["Prefix"] == "ct/"
    (out_rule,) = s3.get_bucket_lifecycle_configuration(Bucket=results)["Rules"]  # the output's rule unchanged
    assert out_rule["ID"] == aws_setup.LIFECYCLE_RULE_ID and out_rule["Transitions"][0]["Days"] == 30

    # Changing N replaces the rule rather than adding a second one.
    run_setup(*base, "--input", f"s3://{inputs}/ct", "--input-glacier-days", "120")
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=inputs)["Rules"]}
    assert len(rules) == 2 and rules[aws_setup.INPUT_LIFECYCLE_RULE_ID]["Transitions"][0]["Days"] == 120


def test_input_glacier_rule_that_would_move_the_results_is_refused(moto_server):
    suffix = uuid.uuid4().hex[:8]
    args = [
        "--table",
        f"passports-{suffix}",
        "--output",
        f"s3://shared-{suffix}/data/results/",
        "--input",
        f"s3://shared-{suffix}/data/",
        "--input-glacier-days",
        "30",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "setup_aws.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "would move the results as well" in proc.stderr
    assert "shared-" + suffix not in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]


def test_lifecycle_rule_moves_only_large_objects_under_the_prefix():
    rule = aws_setup.lifecycle_rule("ct/")
    assert rule["Filter"] == {"And": {"Prefix": "ct/", "ObjectSizeGreaterThan": 128 * 1024}}
    assert aws_setup.lifecycle_rule("")["Filter"] == {"ObjectSizeGreaterThan": 128 * 1024}
    scans = aws_setup.lifecycle_rule("ct/", rule_id=aws_setup.INPUT_LIFECYCLE_RULE_ID, days=90)
    assert scans["Filter"] == rule["Filter"] and scans["Transitions"] == [{"Days": 90, "StorageClass": "GLACIER_IR"}]


# ------------------------------------------------------------------------------------------ IAM as data

#: The SSM agent's message channels: AWS offers no resource-level permissions for them (AmazonSSMManagedInstanceCore).
SSM_CHANNELS = (
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
)
#: Writes that AWS allows only on "*": each bounded otherwise (a condition) or harmless outside the node itself.
NO_RESOURCE_LEVEL = {"cloudwatch:PutMetricData", *SSM_CHANNELS}

DATA_ACTIONS = {
    # Inputs; the job summaries jobs/cost_report.py reads on the cluster; the full passports a compact DynamoDB
    # item points at (Serve's GET /v1/passports). Not the masks or DICOM-SEGs.
    "s3:GetObject": {
        f"arn:aws:s3:::{PARAMS.input_bucket}/*",
        f"arn:aws:s3:::{PARAMS.output_bucket}/{PARAMS.output_prefix}_jobs/*",
        f"arn:aws:s3:::{PARAMS.output_bucket}/{PARAMS.output_prefix}*/passport.json",
    },
    # Listing: the inputs (a DICOM prefix), and the job summary's parts only (a re-run replaces them).
    "s3:ListBucket": {f"arn:aws:s3:::{PARAMS.input_bucket}", f"arn:aws:s3:::{PARAMS.output_bucket}"},
    "s3:PutObject": {f"arn:aws:s3:::{PARAMS.output_bucket}/{PARAMS.output_prefix}*"},
    "s3:DeleteObject": {f"arn:aws:s3:::{PARAMS.output_bucket}/{PARAMS.output_prefix}_jobs/*"},
    "dynamodb:GetItem": {"arn:aws:dynamodb:us-east-1:123456789012:table/passports"},
    "dynamodb:BatchGetItem": {"arn:aws:dynamodb:us-east-1:123456789012:table/passports"},
    "dynamodb:PutItem": {"arn:aws:dynamodb:us-east-1:123456789012:table/passports"},
    "dynamodb:Query": {
        "arn:aws:dynamodb:us-east-1:123456789012:table/passports",
        "arn:aws:dynamodb:us-east-1:123456789012:table/passports/index/job_id-index",
    },
    "ecr:GetAuthorizationToken": {"*"},  # ECR's login has no resource; it grants no pull by itself
    "ecr:BatchGetImage": {"arn:aws:ecr:us-east-1:123456789012:repository/ray-app"},
    "ecr:GetDownloadUrlForLayer": {"arn:aws:ecr:us-east-1:123456789012:repository/ray-app"},
    # The CloudWatch agent (deploy/cloudwatch/agent.json): the log groups of this cluster and of its Serve cluster
    # (deploy/serve-cluster.yaml, named <cluster>-serve; its agent puts Serve's request counts there as EMF), the
    # config as Ray stores it for each.
    **{
        f"logs:{a}": {
            "arn:aws:logs:us-east-1:123456789012:log-group:/ray-app/ray-app/*",
            "arn:aws:logs:us-east-1:123456789012:log-group:/ray-app/ray-app-serve/*",
        }
        for a in ("CreateLogGroup", "CreateLogStream", "PutLogEvents", "DescribeLogStreams", "PutRetentionPolicy")
    },
    "cloudwatch:PutMetricData": {"*"},  # no resource-level permission; limited to two namespaces by a condition
    "ssm:GetParameter": {
        "arn:aws:ssm:us-east-1:123456789012:parameter/AmazonCloudWatch-ray_*_config_ray-app",
        "arn:aws:ssm:us-east-1:123456789012:parameter/AmazonCloudWatch-ray_*_config_ray-app-serve",
    },
    "ec2:DescribeTags": {"*"},
    # Managed by SSM, so Ray's launcher can run the agent's own document on the node.
    "ssm:UpdateInstanceInformation": {"arn:aws:ec2:us-east-1:123456789012:instance/*"},
    **{a: {"*"} for a in SSM_CHANNELS},
}
READ_ONLY_PREFIXES = ("Describe", "Get", "List")


def grants(policy: dict) -> dict[str, set[str]]:
    """action -> resources it is allowed on."""
    out: dict[str, set[str]] = {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        for action in actions:
            out.setdefault(action, set()).update(resources)
    return out


@pytest.mark.parametrize("name", [aws_setup.DATA_POLICY, aws_setup.HEAD_POLICY])
def test_policy_templates_use_exactly_the_documented_parameters(name):
    text = (aws_setup.DEPLOY_DIR / name).read_text()
    placeholders = {m.group("braced") for m in string.Template.pattern.finditer(text) if m.group("braced")}
    assert placeholders <= set(PARAMS.template_values())
    rendered = json.dumps(aws_setup.render_policy(name, **PARAMS.template_values()))
    assert "${" not in rendered


@pytest.mark.parametrize("name", [aws_setup.DATA_POLICY, aws_setup.HEAD_POLICY])
def test_no_wildcard_actions_and_no_wildcard_resources_for_writes(name):
    policy = aws_setup.render_policy(name, **PARAMS.template_values())
    assert policy["Version"] == "2012-10-17"
    for action, resources in grants(policy).items():
        assert "*" not in action, action
        if not action.split(":")[1].startswith(READ_ONLY_PREFIXES) and action not in NO_RESOURCE_LEVEL:
            assert "*" not in resources, f"{action} may write anywhere"


def test_data_policy_grants_only_the_listed_actions_on_the_listed_resources():
    policy = aws_setup.render_policy(aws_setup.DATA_POLICY, **PARAMS.template_values())
    assert grants(policy) == DATA_ACTIONS
    conditioned = {st["Action"][0]: st["Condition"] for st in policy["Statement"] if "Condition" in st}
    assert set(conditioned) == {"s3:ListBucket", "cloudwatch:PutMetricData"}
    # The output bucket may be listed only under the job summaries (a re-run replaces its parts).
    assert conditioned["s3:ListBucket"] == {"StringLike": {"s3:prefix": [f"{PARAMS.output_prefix}_jobs/*"]}}
    from ray_app.ops import (
        cloudwatch,  # the job's namespace and the agent's (deploy/cloudwatch/agent.json)
    )

    agent = json.loads((REPO / "deploy" / "cloudwatch" / "agent.json").read_text())
    assert conditioned["cloudwatch:PutMetricData"] == {
        "StringEquals": {"cloudwatch:namespace": [cloudwatch.DEFAULT_NAMESPACE, agent["metrics"]["namespace"]]}
    }


def test_head_policy_only_manages_this_clusters_workers():
    policy = aws_setup.render_policy(aws_setup.HEAD_POLICY, **PARAMS.template_values())
    granted = grants(policy)
    # Describe* of subnets and groups: `ray down` on the head re-reads the cluster's network before it terminates
    # the nodes (the dead-man's switch runs it there).
    assert set(granted) == {
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceTypes",
        "ec2:DescribeSubnets",
        "ec2:DescribeSecurityGroups",
        "ec2:RunInstances",
        "ec2:CreateTags",
        "ec2:TerminateInstances",
        "iam:PassRole",
        "ssm:GetParameters",
        # Ray's launcher sets up CloudWatch on the workers the head starts (cluster.yaml)
        "ssm:SendCommand",
        "ssm:ListCommandInvocations",
        "ec2:DescribeInstanceStatus",
        "cloudwatch:PutMetricAlarm",
    }
    assert granted["cloudwatch:PutMetricAlarm"] == {"arn:aws:cloudwatch:us-east-1:123456789012:alarm:ray-app-*"}
    assert granted["ssm:SendCommand"] == {
        "arn:aws:ec2:us-east-1:123456789012:instance/*",
        "arn:aws:ssm:us-east-1::document/AmazonCloudWatch-ManageAgent",
    }
    assert granted["iam:PassRole"] == {f"arn:aws:iam::123456789012:role/{aws_setup.WORKER_ROLE}"}
    by_sid = {st["Sid"]: st for st in policy["Statement"]}
    terminate = by_sid["RetagAndTerminateOwnNodes"]
    clusters = [PARAMS.cluster_name, f"{PARAMS.cluster_name}-serve"]  # the batch cluster and the Serve endpoint's
    assert terminate["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == clusters
    assert (
        by_sid["LaunchWorkersOfTheClusterTypes"]["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"]
        == clusters
    )

    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert cluster["cluster_name"] == PARAMS.cluster_name
    worker_types = {
        t["node_config"]["InstanceType"]
        for name, t in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    }
    launch = by_sid["LaunchWorkersOfTheClusterTypes"]["Condition"]["StringEquals"]
    assert set(launch["ec2:InstanceType"]) == worker_types, "cluster.yaml and the head policy disagree"
    assert all(
        re.fullmatch(r"arn:aws:[a-z0-9]+:[a-z0-9-]*:(\d{12})?:.+", r)
        for resources in granted.values()
        for r in resources
        if r != "*"
    )
