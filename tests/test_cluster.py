"""``cluster.yaml``: checked by Ray's schema and botocore's EC2 model, bootstrapped and launched by Ray's real AWS
node provider against moto, and its node types autoscaled for real (0 -> N -> 0) by Ray's fake multinode
provider on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import botocore.session
import pytest
import yaml
from botocore.validate import ParamValidator

from ray_app.adapters.batch import BatchConfig, plan_shape
from ray_app.ops import aws_setup
from tests._fake_cluster import (
    LABELS,
    REPO,
    fake_cluster,
    label_of,
    load_cluster,
    prepared_cluster,
    workers,
)

# ------------------------------------------------------------------------------------------ static checks


def test_cluster_yaml_passes_rays_schema_and_has_the_intended_shape():
    config = prepared_cluster()
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"
    assert head["resources"] == {"CPU": 0}, "no scan work on the head"
    assert head["node_config"]["IamInstanceProfile"] == {"Name": aws_setup.HEAD_ROLE}

    by_label: dict[str, list[str]] = {}
    for name, node_type in workers(config).items():
        node = node_type["node_config"]
        label = label_of(node_type)
        by_label.setdefault(label, []).append(name)
        assert node["InstanceType"].startswith(LABELS[label]), f"{name}: {node['InstanceType']} labelled {label}"
        assert node["InstanceMarketOptions"]["MarketType"] == "spot"
        assert node_type["min_workers"] == 0 and node_type["max_workers"] > 0
        assert node["IamInstanceProfile"] == {"Name": aws_setup.WORKER_ROLE}
        assert all(m["Ebs"]["Encrypted"] for m in node["BlockDeviceMappings"])
    assert sorted(by_label) == ["spot_cpu", "spot_gpu"]
    assert config["idle_timeout_minutes"] > 0 and config["provider"]["cache_stopped_nodes"] is False

    assert all(
        t["node_config"]["InstanceInitiatedShutdownBehavior"] == "terminate"
        for t in config["available_node_types"].values()
    ), "a node that shuts itself down must not linger"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("--disable-usage-stats" in c for c in starts if "ray start" in c)


def test_rays_autoscaler_launches_the_worker_type_the_cost_report_prices():
    """The CPU actors' request fits every spot_cpu type equally well (same vCPUs and memory), so Ray's autoscaler
    falls back on the node type's name; cluster.yaml's fallback is named to lose that tie. Checked with Ray's own
    scheduler, each type's CPU and memory filled in the way Ray's AWS provider does from EC2's instance data
    (moto's copy of DescribeInstanceTypes), and against the type ``ray-app cost`` prices by default."""
    import functools

    from moto.ec2.models.instance_types import INSTANCE_TYPES
    from ray._private import ray_constants
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    from ray_app.ops import cost

    config = load_cluster()
    types = {}
    for name, node_type in config["available_node_types"].items():
        info = INSTANCE_TYPES[node_type["node_config"]["InstanceType"]]
        filled = {"CPU": info["VCpuInfo"]["DefaultVCpus"]}
        gpus = sum(g["Count"] for g in info.get("GpuInfo", {}).get("Gpus", []))
        if gpus:
            filled["GPU"] = gpus
        if name != config["head_node_type"]:
            memory = info["MemoryInfo"]["SizeInMiB"] * 1024 * 1024
            filled["memory"] = int(memory * (1 - ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION))
        types[name] = {**node_type, "resources": {**filled, **node_type["resources"]}}
    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    # deploy/README.md's CPU job (--cpus-per-actor 1.9 --actor-resource spot_cpu=1 --max-actors 16): its actors
    # and all its CPU-stage tasks at once, as the job plans them.
    cfg = BatchConfig(manifest="m", output="o", cpus_per_actor=1.9, actor_resources={"spot_cpu": 1}, max_actors=16)
    shape = plan_shape(cfg, {})
    tasks = [{"CPU": shape.task_cpus}] * (2 * shape.task_concurrency)  # prepare and finish
    actors = [{"CPU": shape.cpus_per_actor, "spot_cpu": 1}] * shape.max_actors
    added, left = get_nodes_for(types, {}, config["head_node_type"], 16, actors + tasks, scorer)
    assert not left
    (chosen,) = added
    instance = types[chosen]["node_config"]["InstanceType"]
    assert instance == cost.Assumptions(scans_per_month=1).cpu_instance == cost.cluster_instances()["cpu"]
    assert instance == "m7a.4xlarge" and added[chosen] == 2, added  # 8 actors and their tasks per 16-vCPU node
    assert shape.threads == 2
    # Two-CPU actors would fill both nodes, and the autoscaler would start a third for the tasks alone.
    whole = [{"CPU": 2, "spot_cpu": 1}] * shape.max_actors
    more_nodes, _ = get_nodes_for(types, {}, config["head_node_type"], 16, whole + tasks, scorer)
    assert sum(more_nodes.values()) == 3, more_nodes
    # The other spot_cpu type fits the same actors (its vCPUs and memory are the same): a true fallback.
    (fallback,) = [n for n in types if "spot_cpu" in types[n]["resources"] and n != chosen]
    assert {k: types[fallback]["resources"][k] for k in ("CPU", "memory")} == {
        k: types[chosen]["resources"][k] for k in ("CPU", "memory")
    }
    # With the preferred type at its max_workers the autoscaler takes the fallback.
    more, _ = get_nodes_for(types, {chosen: types[chosen]["max_workers"]}, config["head_node_type"], 16, actors, scorer)
    assert list(more) == [fallback]
    # GPU actors get the GPU type the report prices.
    gpu, _ = get_nodes_for(types, {}, config["head_node_type"], 4, [{"CPU": 2, "GPU": 1, "spot_gpu": 1}], scorer)
    assert [types[n]["node_config"]["InstanceType"] for n in gpu] == [cost.cluster_instances()["gpu"]]


def test_every_node_ends_by_itself_and_starts_from_the_prebuilt_image():
    """The head's dead-man's switch ends the cluster with Ray's own teardown; every host's own shutdown backs it up
    after the switch's maximum lifetime; nodes install nothing at boot (the Dockerfile's image has it all)."""
    config = prepared_cluster()
    (deadman,) = [c for c in config["head_start_ray_commands"] if "ray_app.ops.deadman" in c]
    args = deadman.split()
    assert args[args.index("--") + 1 : args.index("--") + 5] == ["ray", "down", "~/ray_bootstrap_config.yaml", "--yes"]
    max_hours = float(args[args.index("--max-hours") + 1])
    assert 0 < float(args[args.index("--idle-minutes") + 1]) <= 60
    assert deadman.startswith("setsid nohup") and deadman.rstrip().endswith("&"), "must outlive the SSH session"
    (backstop,) = [c for c in config["initialization_commands"] if "shutdown -h" in c]
    assert max_hours * 60 < int(backstop.split("+")[1]) <= max_hours * 60 + 120

    assert config["setup_commands"] == [], "nothing installed or downloaded per node"
    images = [config["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t
    ]
    assert all(".dkr.ecr." in i and i.split("/")[-1].startswith("ray-app:") for i in images), images
    dockerfile = (REPO / "Dockerfile").read_text()
    assert (
        "totalseg_download_weights -t total_fast" in dockerfile and "totalseg_download_weights -t total" in dockerfile
    )
    assert "disable_usage_stats()" in dockerfile and "ENV RAY_APP_DOWNLOAD_WEIGHTS=false" in dockerfile


def _run_instances_input():
    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


def _enum_errors(shape, value, path: str = "") -> list[str]:
    """ParamValidator checks types and required members but not enums (e.g. InstanceType); this does."""
    if shape.type_name == "structure" and isinstance(value, dict):
        members = shape.members
        return [e for k, v in value.items() if k in members for e in _enum_errors(members[k], v, f"{path}.{k}")]
    if shape.type_name == "list" and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _enum_errors(shape.member, v, f"{path}[{i}]")]
    if shape.type_name == "string" and shape.enum and value not in shape.enum:
        return [f"{path}: {value!r} is not one of the model's values"]
    return []


def _run_instances_params(node_config: dict) -> dict:
    """What Ray's provider sends: the node_config plus the counts (SubnetIds is Ray's own key, resolved first)."""
    params = {k: v for k, v in node_config.items() if k != "SubnetIds"}
    return {**params, "MinCount": 1, "MaxCount": 1}


@pytest.mark.parametrize("node_type", sorted(load_cluster()["available_node_types"]))
def test_node_config_is_a_valid_run_instances_request(node_type):
    params = _run_instances_params(load_cluster()["available_node_types"][node_type]["node_config"])
    shape = _run_instances_input()
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()
    assert _enum_errors(shape, params) == []


def test_the_validators_reject_a_broken_node_config():
    node = dict(load_cluster()["available_node_types"]["ray.worker.spot_gpu.g6"]["node_config"])
    shape = _run_instances_input()
    wrong_key = ParamValidator().validate(_run_instances_params({**node, "InstanceTyp": "g6.xlarge"}), shape)
    assert wrong_key.has_errors() and "InstanceTyp" in wrong_key.generate_report()
    wrong_type = ParamValidator().validate(_run_instances_params({**node, "MetadataOptions": {"HttpTokens": 1}}), shape)
    assert wrong_type.has_errors()
    assert _enum_errors(shape, _run_instances_params({**node, "InstanceType": "g6.huge"}))


# -------------------------------------------------------------------------- Ray's AWS node provider on moto


def test_rays_aws_provider_bootstraps_and_launches_each_worker_type_on_spot(moto_server, tmp_path, monkeypatch):
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler.tags import (
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_USER_NODE_TYPE,
    )

    monkeypatch.setenv("HOME", str(tmp_path))  # Ray saves the key pair it creates under ~/.ssh
    aws_setup.ensure_iam(
        aws_setup.IamParams(
            input_bucket="scans",
            output_bucket="results",
            output_prefix="ct/",
            table="passports",
            region="us-east-1",
            account_id=aws_setup.account_id(),
        )
    )

    config = prepared_cluster()
    config["provider"]["aws_credentials"] = {
        "endpoint_url": moto_server,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    config = bootstrap_aws(config)
    zones = config["provider"]["availability_zone"].split(",")
    ec2 = boto3.client("ec2", endpoint_url=moto_server, region_name="us-east-1")
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        subnets = ec2.describe_subnets(SubnetIds=node["SubnetIds"])["Subnets"]
        assert sorted(s["AvailabilityZone"] for s in subnets) == sorted(zones)
        assert node["SecurityGroupIds"] and node["KeyName"]
    (group,) = ec2.describe_security_groups(GroupIds=node["SecurityGroupIds"])["SecurityGroups"]
    assert {(p.get("FromPort"), p.get("ToPort")) for p in group["IpPermissions"]} >= {(22, 22), (8000, 8000)}

    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    launched: dict[str, str] = {}
    for name, node_type in config["available_node_types"].items():
        kind = "head" if name == config["head_node_type"] else "worker"
        tags = {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: name, TAG_RAY_NODE_NAME: f"test-{name}"}
        (instance_id,) = provider.create_node(node_type["node_config"], tags, 1)
        launched[instance_id] = name
    assert sorted(provider.non_terminated_nodes({})) == sorted(launched)

    instances = {
        i["InstanceId"]: i
        for r in ec2.describe_instances(InstanceIds=list(launched))["Reservations"]
        for i in r["Instances"]
    }
    for instance_id, name in launched.items():
        instance, node = instances[instance_id], config["available_node_types"][name]["node_config"]
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert instance["InstanceType"] == node["InstanceType"]
        assert tags["ray-user-node-type"] == name and tags["ray-cluster-name"] == "ray-app"
        assert tags["project"] == "ray-app"
        profile = aws_setup.HEAD_ROLE if name == config["head_node_type"] else aws_setup.WORKER_ROLE
        assert instance["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{profile}")
        if name == config["head_node_type"]:
            assert "InstanceLifecycle" not in instance
        else:
            assert instance["InstanceLifecycle"] == "spot"

    provider.terminate_nodes(list(launched))
    states = {
        i["State"]["Name"]
        for r in ec2.describe_instances(InstanceIds=list(launched))["Reservations"]
        for i in r["Instances"]
    }
    assert states <= {"shutting-down", "terminated"}
    assert provider.non_terminated_nodes({}) == []


# ----------------------------------------------------------------------- real autoscaling, fake multinode


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_autoscaler_adds_the_labelled_worker_types_for_a_job_and_removes_them_when_idle(tmp_path):
    with fake_cluster(tmp_path) as cluster:
        out = tmp_path / "job.json"
        job = subprocess.run(
            [sys.executable, str(REPO / "tests" / "autoscale_job.py"), cluster["address"], str(out)],
            check=False,
            env=cluster["env"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert job.returncode == 0, job.stderr[-3000:]
        result = json.loads(out.read_text())
        counts = [(t["t"], len(t["spot_cpu"]), len(t["spot_gpu"])) for t in result["trace"]]
        changes = [c for i, c in enumerate(counts) if i == 0 or c[1:] != counts[i - 1][1:]]
        print(f"job {result['job_s']:.1f} s; (s, Spot CPU nodes, Spot GPU nodes) at each change: {changes}")
    assert cluster["leftovers"] == [], "Ray processes outlived the head"

    trace = result["trace"]
    assert trace[0]["spot_cpu"] == [] and trace[0]["spot_gpu"] == [], "the cluster starts with the head alone"
    seen = {label: {n for sample in trace for n in sample[label]} for label in ("spot_cpu", "spot_gpu")}
    assert seen["spot_cpu"] and seen["spot_gpu"], f"the autoscaler added no labelled worker: {trace}"
    assert trace[-1]["spot_cpu"] == [] and trace[-1]["spot_gpu"] == [], f"not scaled back to zero: {trace[-1]}"

    rows = result["rows"]
    assert sorted(r["id"] for r in rows) == list(range(8))
    assert {r["cpu_node"] for r in rows} <= seen["spot_cpu"]
    assert {r["gpu_node"] for r in rows} <= seen["spot_gpu"]
    assert all(r["gpu_ids"] == 1 for r in rows)


def test_the_serve_endpoints_cluster_is_cluster_yaml_made_always_on_and_small():
    """deploy/serve-cluster.yaml is generated from cluster.yaml; a stale copy fails here."""
    from ray_app.ops.cluster import SERVE_CONFIG_HEADER, serve_cluster_config

    committed = (REPO / "deploy" / "serve-cluster.yaml").read_text()
    assert committed.startswith(SERVE_CONFIG_HEADER)
    assert yaml.safe_load(committed) == serve_cluster_config(load_cluster()), (
        "regenerate: python -m ray_app.ops.cluster serve-config > deploy/serve-cluster.yaml"
    )

    from ray.autoscaler._private.util import prepare_config, validate_config

    serve = prepare_config(yaml.safe_load(committed))
    validate_config(serve)
    batch = prepared_cluster()
    assert serve["cluster_name"] != batch["cluster_name"], "one cluster's ray up/down must not touch the other"
    head = serve["available_node_types"][serve["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m7i.large" and head["resources"] == {"CPU": 0}
    assert all("spot_cpu" in t["resources"] for name, t in workers(serve).items())
    assert {n: t["node_config"] for n, t in workers(serve).items()} == {
        n: t["node_config"] for n, t in workers(batch).items() if n in workers(serve)
    }
    commands = " ; ".join(serve["initialization_commands"] + serve["head_start_ray_commands"])
    assert "deadman" not in commands and "shutdown" not in commands, "the endpoint's head is meant to stay up"
    starts = [c for c in serve["head_start_ray_commands"] + serve["worker_start_ray_commands"] if "ray start" in c]
    assert all("RAY_APP_API_TOKEN_FILE=$HOME/ray-app-token" in c for c in starts)
