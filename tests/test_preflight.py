"""Preflight: a job whose output, table, region or cluster does not fit is refused within seconds, before any
node starts or any scan is segmented. IAM is enforced by the moto server (its ``reset-auth`` switch) for a user
holding the workers' policy as ``jobs/setup_aws.py`` renders it from ``deploy/iam-policy.json``."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from ray_app.adapters.cli import batch_config, build_parser
from ray_app.core.errors import PreflightError
from ray_app.ops import aws_setup
from ray_app.ops.cluster import LocalLauncher
from ray_app.ops.preflight import check_shape, complete_shape, policy_allows
from tests._fake_cluster import REPO, load_cluster
from tests._scan_factory import small_phantom

RAY_APP = str(Path(sys.executable).with_name("ray-app"))
MODEL = "total_fast"


def _set_auth(endpoint: str, count: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )  # moto reads the raw body
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def aws(moto_server):
    """Input and output buckets, a passport table, the roles, and an IAM user with the workers' data policy."""
    suffix = uuid.uuid4().hex[:8]
    names = {"scans": f"scans-{suffix}", "results": f"results-{suffix}", "table": f"passports-{suffix}"}
    s3 = boto3.client("s3")
    aws_setup.setup(names["table"], names["results"], "ct/")
    s3.create_bucket(Bucket=names["scans"])
    s3.put_object(Bucket=names["scans"], Key="in/scan-0.nii.gz", Body=small_phantom(500))
    s3.put_object(
        Bucket=names["scans"],
        Key="in/manifest.csv",
        Body=f"scan_id,uri\nscan-0,s3://{names['scans']}/in/scan-0.nii.gz\n".encode(),
    )
    params = aws_setup.IamParams(
        input_bucket=names["scans"],
        output_bucket=names["results"],
        output_prefix="ct/",
        table=names["table"],
        region="us-east-1",
        account_id=aws_setup.account_id(),
    )
    aws_setup.ensure_iam(params)
    policy = aws_setup.render_policy(aws_setup.DATA_POLICY, **params.template_values())
    # moto authorises a DynamoDB request against the resource "*" (it resolves no table ARNs; S3 it checks by
    # bucket and key), so the table statements are repeated for "*" here; the S3 prefix rules stay exact.
    table_actions = sorted(
        {a for st in policy["Statement"] for a in st["Action"] if a.startswith("dynamodb:")}
    )  # exactly the policy's own DynamoDB actions
    policy["Statement"].append({"Effect": "Allow", "Action": table_actions, "Resource": "*"})
    iam = boto3.client("iam")
    user = f"worker-{suffix}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="ray-app-data", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    names["worker_env"] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    return names


@pytest.fixture
def enforced(aws, moto_server):
    _set_auth(moto_server, "0")
    try:
        yield aws
    finally:
        _set_auth(moto_server, "inf")


def _batch(
    aws: dict, output: str, *, table: str | None = None, env: dict | None = None, timeout: float = 300
) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [
            RAY_APP,
            "batch",
            "--manifest",
            f"s3://{aws['scans']}/in/manifest.csv",
            "--output",
            output,
            "--table",
            table or aws["table"],
            "--max-actors",
            "1",
        ],
        env={**os.environ, **aws["worker_env"], **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _keys(bucket: str) -> list[str]:
    return [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_with_the_workers_policy_a_job_writes_under_its_prefix_and_the_preflight_refuses_all_else(
    enforced, phantom_weights
):
    aws = enforced
    code, text, seconds = _batch(aws, f"s3://{aws['results']}/elsewhere/")
    assert code == 2, text[-2000:]
    assert f"preflight_failed: cannot write under s3://{aws['results']}/elsewhere/" in text and "AccessDenied" in text
    assert seconds < 30 and "Started a local Ray instance" not in text, "refused only after Ray started"

    code, text, seconds = _batch(aws, f"s3://{aws['results']}/ct/", table="no-such-table")
    assert code == 2 and seconds < 30, text[-2000:]
    assert "DynamoDB table 'no-such-table' does not exist (AWS region us-east-1, from AWS_REGION" in text

    code, text, seconds = _batch(aws, f"s3://{aws['results']}/ct/", env={"RAY_APP_AWS_REGION": "eu-west-1"})
    assert code == 2 and seconds < 30, text[-2000:]
    assert f"DynamoDB table '{aws['table']}' does not exist (AWS region eu-west-1, from RAY_APP_AWS_REGION)" in text

    code, text, _ = _batch(aws, f"s3://{aws['results']}/ct/", env={"TOTALSEG_WEIGHTS_PATH": str(phantom_weights)})
    assert code == 0, text[-3000:]
    _set_auth(os.environ["AWS_ENDPOINT_URL"], "inf")  # read back as the operator
    keys = _keys(aws["results"])
    assert f"ct/scan-0/{MODEL}/mask.nii.gz" in keys and f"ct/scan-0/{MODEL}/passport.json" in keys
    assert not [k for k in keys if not k.startswith("ct/")], "nothing may land outside the job's prefix"


def _cluster_run(*args: str, env: dict | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [RAY_APP, "cluster", "run", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_the_cluster_preflight_refuses_another_region_and_a_prefix_the_workers_role_may_not_write(aws):
    batch = ["--", "--manifest", f"s3://{aws['scans']}/in/manifest.csv", "--table", aws["table"]]
    code, text = _cluster_run(*batch, "--output", f"s3://{aws['results']}/ct/", env={"AWS_REGION": "eu-west-1"})
    assert code == 2, text
    assert "cluster.yaml launches in us-east-1, but the job's table and bucket would be used in eu-west-1" in text

    code, text = _cluster_run(*batch, "--output", f"s3://{aws['results']}/elsewhere/")
    assert code == 2, text
    assert f"role ray-app-worker may not write under s3://{aws['results']}/elsewhere/" in text
    assert "local cluster up" not in text and "Started" not in text

    code, text = _cluster_run(*batch, "--output", f"s3://{aws['results']}/ct/")
    assert code == 2, text
    assert "shape: --actor-resource spot_cpu=1 --cpus-per-actor 1.9 --max-actors 8 (for cluster.yaml's workers" in text
    assert "preflight: actors 8 per m7a.4xlarge with 0.8 CPUs for the CPU stages" in text
    assert "preflight: role ray-app-worker may write under" in text
    assert "cluster.yaml still names the placeholder image registry" in text, "the last check before any launch"

    whole = ["--cpus-per-actor", "2", "--actor-resource", "spot_cpu=1", "--max-actors", "16"]
    code, text = _cluster_run(*batch, *whole, "--output", f"s3://{aws['results']}/ct/")
    assert code == 2, text
    assert "--cpus-per-actor 2: 8 actor(s) fill a node of type m7a.4xlarge (16 vCPUs)" in text
    assert "Use --cpus-per-actor 1.9 (the same 8 per node)" in text and "preflight: manifest" not in text


def _documented_jobs() -> list[list[str]]:
    """The batch options of deploy/README.md's ``ray-app cluster run`` lines that pin actors to a node type."""
    text = (REPO / "deploy" / "README.md").read_text().replace("\\\n", " ")
    lines = [line.split(" -- ", 1)[1].split("#")[0] for line in text.splitlines() if "ray-app cluster run -- " in line]
    return [shlex.split(line.replace("...", "")) for line in lines if "--actor-resource" in line]


def test_pinned_actor_shapes_leave_their_nodes_room_for_the_cpu_stages():
    """Actors that fill a node's vCPUs would leave the fetch and write tasks no room on it: the cluster preflight
    refuses them with the size to use; the documented CPU and GPU jobs pass, with room for their stage tasks."""
    cluster = load_cluster()
    documented = _documented_jobs()
    assert len(documented) == 2, documented
    for options in documented:
        cfg = batch_config(
            build_parser().parse_args(
                ["batch", "--manifest", "m.csv", "--output", "s3://b/o/", "--table", "t", *options]
            )
        )
        found = check_shape(cluster, cfg)
        assert found.startswith("actors ") and "with 0 CPUs" not in found, found
    for options, message in [
        (["--cpus-per-actor", "8", "--max-actors", "4"], "Use --cpus-per-actor 7.9 (the same 2 per node)"),
        (["--cpus-per-actor", "1", "--max-actors", "64"], "Use --cpus-per-actor 0.9 (the same 16 per node)"),
        (["--cpus-per-actor", "32"], "fits no node type offering spot_cpu"),
        (["--device", "cuda", "--gpus-per-actor", "1", "--cpus-per-actor", "4"], "Use --cpus-per-actor 3.6"),
    ]:
        label = "spot_gpu=1" if "cuda" in options else "spot_cpu=1"
        args = [
            "batch",
            "--manifest",
            "m.csv",
            "--output",
            "s3://b/o/",
            "--table",
            "t",
            *options,
            "--actor-resource",
            label,
        ]
        with pytest.raises(PreflightError) as err:
            check_shape(cluster, batch_config(build_parser().parse_args(args)))
        assert message in err.value.message, err.value.message
    few = ["--cpus-per-actor", "2", "--actor-resource", "spot_cpu=1", "--max-actors", "2"]
    cfg = batch_config(
        build_parser().parse_args(["batch", "--manifest", "m.csv", "--output", "s3://b/o/", "--table", "t", *few])
    )
    assert "2 per m7a.4xlarge with 12 CPUs" in check_shape(cluster, cfg), "two actors do not fill a node"


def test_a_cluster_job_with_no_actor_options_gets_one_node_of_the_documented_actors():
    """The workers start from zero, so an unpinned job would size itself by whatever node its first task started
    (one actor with all of a node's threads, at about half the per-thread efficiency): cluster run fills in the
    deploy/README.md shape for cluster.yaml's node types, keeps any option given, and what it fills in passes the
    shape check, on AWS and on the local rehearsal's one-CPU stand-ins."""

    def completed(cluster: dict, *options: str) -> list[str]:
        cfg = batch_config(
            build_parser().parse_args(
                ["batch", "--manifest", "m.csv", "--output", "s3://b/o/", "--table", "t", *options]
            )
        )
        shape = complete_shape(cluster, cfg)
        check_shape(
            cluster,
            batch_config(build_parser().parse_args(["batch", "--manifest", "m", "--output", "o", *options, *shape])),
        )
        return shape

    aws, local = load_cluster(), LocalLauncher().node_types()
    (cpu_job, gpu_job) = _documented_jobs()
    assert completed(aws) == ["--actor-resource", "spot_cpu=1", "--cpus-per-actor", "1.9", "--max-actors", "8"]
    gpu = completed(aws, "--device", "cuda")
    assert gpu == ["--actor-resource", "spot_gpu=1", "--cpus-per-actor", "2", "--max-actors", "1"]  # a GPU each
    for shape, documented in ((completed(aws), cpu_job), (gpu, gpu_job)):  # deploy/README.md's own values
        given = dict(zip(documented, documented[1:], strict=False))
        assert all(given[k] == v for k, v in zip(shape[::2], shape[1::2], strict=True) if k != "--max-actors")
    assert completed(aws, "--max-actors", "16") == ["--actor-resource", "spot_cpu=1", "--cpus-per-actor", "1.9"]
    assert completed(aws, "--cpus-per-actor", "1.9", "--actor-resource", "spot_cpu=1", "--max-actors", "16") == []
    assert completed(aws, "--actor-resource", "spot_cpu=1", "--cpus-per-actor", "3.9") == ["--max-actors", "4"]
    assert completed(local) == ["--actor-resource", "spot_cpu=1", "--cpus-per-actor", "0.8", "--max-actors", "1"]


def test_policy_allows_follows_iams_wildcards_and_explicit_denies():
    doc = {"Statement": [{"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::b/ct/*"]}]}
    assert policy_allows(doc, "s3:PutObject", "arn:aws:s3:::b/ct/x/passport.json")
    assert not policy_allows(doc, "s3:PutObject", "arn:aws:s3:::b/other/x")
    assert not policy_allows(doc, "s3:GetObject", "arn:aws:s3:::b/ct/x")
    deny = {"Effect": "Deny", "Action": "s3:*", "Resource": "arn:aws:s3:::b/ct/secret/*"}
    assert not policy_allows({"Statement": [*doc["Statement"], deny]}, "s3:PutObject", "arn:aws:s3:::b/ct/secret/a")
    conditioned = {"Statement": [{**doc["Statement"][0], "Condition": {"Bool": {"aws:SecureTransport": "true"}}}]}
    assert not policy_allows(conditioned, "s3:PutObject", "arn:aws:s3:::b/ct/x")
