"""CloudWatch: cluster.yaml's ``provider.cloudwatch`` through Ray's own helper against moto, the names in
``deploy/cloudwatch/`` against what the code emits, and the batch job's metrics put for real."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess

import boto3
import pytest
from botocore.exceptions import ClientError

from ray_app.adapters import cli
from ray_app.ops import cloudwatch
from tests._fake_cluster import REPO, load_cluster

CW_DIR = REPO / "deploy" / "cloudwatch"


def prepared_cluster() -> dict:
    """cluster.yaml as ``ray-app cluster run --cloudwatch`` launches it, through Ray's own schema validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(cloudwatch.with_cloudwatch(load_cluster()))
    validate_config(config)
    return config


def _load(name: str):
    return json.loads((CW_DIR / name).read_text())


def _helper(config: dict, node_id: str):
    from ray.autoscaler._private.aws.cloudwatch.cloudwatch_helper import (
        CloudwatchHelper,
    )

    return CloudwatchHelper(config["provider"], node_id, config["cluster_name"])


def test_cluster_yaml_names_the_dashboard_and_alarms_the_way_rays_launcher_reads_them(moto_server, monkeypatch):
    from ray.autoscaler._private.aws.cloudwatch.cloudwatch_helper import (
        CloudwatchHelper,
    )

    assert "cloudwatch" not in load_cluster()["provider"], "opt-in: an SSM wait on every node's start-up path"
    config = prepared_cluster()  # Ray's schema validator passes with the cloudwatch section
    provider = config["provider"]
    assert CloudwatchHelper.cloudwatch_config_exists(provider, "dashboard")
    assert CloudwatchHelper.cloudwatch_config_exists(provider, "alarm")
    assert (
        provider["cloudwatch"]["agent"]["retryer"]["max_attempts"]
        * provider["cloudwatch"]["agent"]["retryer"]["delay_seconds"]
        <= 600
    )  # a node waits at most 10 min for SSM

    monkeypatch.chdir(REPO)  # Ray resolves the paths against the working directory of `ray up`
    helper = _helper(config, "i-0123456789abcdef0")
    helper._put_cloudwatch_dashboard()  # Ray's own call, against moto
    cw = boto3.client("cloudwatch")
    body = json.loads(cw.get_dashboard(DashboardName="ray-app-jobs")["DashboardBody"])
    assert len(body["widgets"]) == len(_load("dashboard.json"))
    assert "{region}" not in json.dumps(body) and "{cluster_name}" not in json.dumps(body)

    for alarm in helper._replace_alarm_config_vars("alarm"):  # what Ray uploads, then puts per node
        helper._replace_all_config_variables(alarm, "i-0123456789abcdef0", "ray-app", "us-east-1")
        cw.put_metric_alarm(**alarm)
    names = {a["AlarmName"] for a in cw.describe_alarms(AlarmNamePrefix="ray-app-")["MetricAlarms"]}
    assert names == {"ray-app-job-failure-share", "ray-app-node-i-0123456789abcdef0-up-13h"}
    # Every alarm name starts with the cluster name: the head's policy may put only those (deploy/iam-head-policy.json).
    assert all(a["AlarmName"].startswith("{cluster_name}-") for a in _load("alarms.json"))

    from ray_app.ops.cluster import serve_cluster_config

    # The always-on Serve head would trip the 13 h alarm: its cluster gets none of these.
    assert "cloudwatch" not in serve_cluster_config(load_cluster())["provider"]


def test_preflight_stops_a_cluster_run_started_where_ray_cannot_find_the_files(monkeypatch, tmp_path):
    from ray_app.core.errors import PreflightError

    monkeypatch.chdir(REPO)
    assert "deploy/cloudwatch/alarms.json" in cloudwatch.check_cluster_files(cloudwatch.with_cloudwatch(load_cluster()))
    assert cloudwatch.check_cluster_files(load_cluster()) == "CloudWatch: not configured"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PreflightError, match="run from the checkout's root"):
        cloudwatch.check_cluster_files(cloudwatch.with_cloudwatch(load_cluster()))


def test_the_agent_is_off_while_node_images_are_resolve_ssm_because_rays_launcher_cannot_look_them_up(moto_server):
    """With ``agent: config:``, Ray's create_node first calls DescribeImages on the node's ImageId (to tag AMIs with
    the agent preinstalled): a ``resolve:ssm:`` ImageId is refused there, so every node launch would fail."""
    config = prepared_cluster()
    image_ids = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    if any(i.startswith("resolve:ssm:") for i in image_ids):
        assert not config["provider"]["cloudwatch"]["agent"].get("config")
    ec2 = boto3.client("ec2")
    for image in image_ids:
        if image.startswith("resolve:ssm:"):
            with pytest.raises(ClientError, match="InvalidAMIID.Malformed"):
                ec2.describe_images(ImageIds=[image])  # the call ray/autoscaler/_private/aws/node_provider.py makes


def test_names_in_the_cloudwatch_files_match_what_the_code_and_ray_emit():
    agent, alarms, dashboard = _load("agent.json"), _load("alarms.json"), _load("dashboard.json")
    text = json.dumps([alarms, dashboard])
    # The job's metrics: every name used for the job namespace is one ray_app.ops.cloudwatch puts, and both are used.
    used = set(re.findall(r'"Namespace": "ray-app", "MetricName": "(\w+)"', json.dumps(alarms)))
    used |= {m[1] for w in dashboard for m in w["properties"].get("metrics", []) if m and m[0] == "ray-app"}
    used |= set(re.findall(r"SEARCH\('\{ray-app,\w+\} MetricName=\\\"(\w+)\\\"", text))
    assert used == set(cloudwatch.METRIC_NAMES)
    assert f"{{ray-app,{cloudwatch.ERROR_CODE}}}" in text and cloudwatch.DEFAULT_NAMESPACE == "ray-app"
    # The agent's metrics and log groups, as the dashboard reads them.
    assert f"{{{agent['metrics']['namespace']},InstanceId}}" in text
    groups = {f["log_group_name"] for f in agent["logs"]["logs_collected"]["files"]["collect_list"]}
    assert set(re.findall(r"SOURCE '([^']+)'", text)) <= groups
    # Each collected file pattern matches a log file name Ray writes.
    from ray.dashboard.modules.job.common import JOB_LOGS_PATH_TEMPLATE

    patterns = [f["file_path"] for f in agent["logs"]["logs_collected"]["files"]["collect_list"]]
    logs = "/tmp/ray/session_latest/logs/"
    for name in (
        JOB_LOGS_PATH_TEMPLATE.format(submission_id="raysubmit_abc"),
        "ray-data/ray-data.log",
        "serve/proxy_10.0.0.1.log",
        "monitor.log",
    ):
        assert any(fnmatch.fnmatch(logs + name, p) for p in patterns), name
    # Never the runtime_env agent's log: it holds every variable a job carries (ENVIRONMENT.md).
    assert not any(fnmatch.fnmatch(logs + "runtime_env_agent.log", p) for p in patterns)
    assert all(
        f["retention_in_days"] in (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365)
        for f in agent["logs"]["logs_collected"]["files"]["collect_list"]
    )


def test_job_metric_data_counts_scans_and_codes_without_ids(monkeypatch):
    rows = [
        {"scan_id": "a", "status": "ok"},
        {"scan_id": "b", "status": "failed", "error_code": "truncated_file"},
        {"scan_id": "c", "status": "rejected", "error_code": "not_ct"},
        {"scan_id": "d", "status": "ok"},
    ]
    data = cloudwatch.job_metric_data(rows)
    plain = {d["MetricName"]: d["Value"] for d in data if "Dimensions" not in d}
    assert plain == {"ScansSucceeded": 2.0, "ScansFailed": 2.0}
    assert {d["Dimensions"][0]["Value"]: d["Value"] for d in data if "Dimensions" in d} == {
        "truncated_file": 1.0,
        "not_ct": 1.0,
    }
    assert '"a"' not in json.dumps(data) and '"b"' not in json.dumps(data)
    monkeypatch.delenv(cloudwatch.ENV_NAMESPACE, raising=False)
    assert cloudwatch.publish_job(rows) is False  # off unless asked: local runs never call CloudWatch


@pytest.mark.timeout(300)
def test_a_batch_job_puts_its_counts_to_cloudwatch_when_asked(ray_cluster, tmp_path, monkeypatch):
    from tests._scan_factory import small_phantom

    (tmp_path / "ok.nii.gz").write_bytes(small_phantom(801))
    (tmp_path / "cut.nii.gz").write_bytes(small_phantom(802)[:2000])
    (tmp_path / "m.csv").write_text(f"scan_id,uri\nok,{tmp_path / 'ok.nii.gz'}\ncut,{tmp_path / 'cut.nii.gz'}\n")
    namespace = f"ray-app-test-{os.getpid()}"
    monkeypatch.setenv(cloudwatch.ENV_NAMESPACE, namespace)
    assert (
        cli.main(
            [
                "batch",
                "--manifest",
                str(tmp_path / "m.csv"),
                "--output",
                str(tmp_path / "out"),
                "--job-id",
                "cw-1",
                "--max-actors",
                "1",
            ]
        )
        == 1
    )  # one scan failed

    cw = boto3.client("cloudwatch")
    metrics = cw.list_metrics(Namespace=namespace)["Metrics"]
    assert {(m["MetricName"], tuple((d["Name"], d["Value"]) for d in m["Dimensions"])) for m in metrics} == {
        ("ScansSucceeded", ()),
        ("ScansFailed", ()),
        ("ScansFailedByCode", (("ErrorCode", "truncated_file"),)),
    }
    # The alarm's expression over what was put: 1 failed of 2 is over its 10% threshold.
    (alarm,) = [a for a in _load("alarms.json") if a["AlarmName"].endswith("job-failure-share")]
    sums = {}
    for q in alarm["Metrics"][:2]:
        stat = cw.get_metric_statistics(
            Namespace=namespace,
            MetricName=q["MetricStat"]["Metric"]["MetricName"],
            StartTime="2000-01-01T00:00:00Z",
            EndTime="2100-01-01T00:00:00Z",
            Period=q["MetricStat"]["Period"],
            Statistics=["Sum"],
        )
        sums[q["Id"]] = sum(p["Sum"] for p in stat["Datapoints"])
    assert sums == {"failed": 1.0, "succeeded": 1.0}
    assert sums["failed"] / (sums["failed"] + sums["succeeded"]) > alarm["Threshold"]


# ------------------------------------------------------------------------------------------ Serve 5xx


def _serve_alarm() -> dict:
    (alarm,) = _load("serve-alarms.json")
    return alarm


def test_the_serve_clusters_5xx_alarm_goes_through_rays_launcher(moto_server, monkeypatch):
    """deploy/serve-cluster.yaml with deploy/cloudwatch/serve-provider.yaml passes Ray's validator, and Ray's own
    helper puts the one alarm, named for the cluster (the head policy's PutMetricAlarm covers <cluster>-*)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    from ray_app.ops.cluster import serve_cluster_config

    config = prepare_config(
        cloudwatch.with_cloudwatch(serve_cluster_config(load_cluster()), cloudwatch.SERVE_PROVIDER_YAML)
    )
    validate_config(config)
    section = config["provider"]["cloudwatch"]
    assert "dashboard" not in section and section["alarm"]["config"] == "deploy/cloudwatch/serve-alarms.json"
    assert section["agent"]["retryer"]["max_attempts"] * section["agent"]["retryer"]["delay_seconds"] <= 600
    monkeypatch.chdir(REPO)
    assert cloudwatch.check_cluster_files(config).startswith("CloudWatch files:")
    helper = _helper(config, "i-0123456789abcdef0")
    cw = boto3.client("cloudwatch")
    for alarm in helper._replace_alarm_config_vars("alarm"):
        helper._replace_all_config_variables(alarm, "i-0123456789abcdef0", config["cluster_name"], "us-east-1")
        cw.put_metric_alarm(**alarm)
    (put,) = cw.describe_alarms(AlarmNamePrefix="ray-app-serve-")["MetricAlarms"]
    assert put["AlarmName"] == "ray-app-serve-5xx" and put["AlarmName"].startswith("ray-app-")
    # Neither the batch cluster's alarms (a 13 h alarm on an always-on head) nor its dashboard.
    assert not {a["AlarmName"] for a in _load("alarms.json")} & {a["AlarmName"] for a in _load("serve-alarms.json")}


def test_the_serve_5xx_alarm_reads_the_metric_the_agent_makes_of_rays_counter(moto_server):
    """Three files, one name: the Prometheus scrape keeps Ray Serve's request counter, the agent turns it into a
    CloudWatch metric (namespace, name, the status_code dimension), and the alarm adds up the 5xx codes but 503.
    Then the alarm's arithmetic over data put in that shape: 503s alone do not breach, one 502 does."""
    import yaml

    scrape = yaml.safe_load((CW_DIR / "prometheus.yaml").read_text())
    (job,) = scrape["scrape_configs"]
    (keep,) = job["metric_relabel_configs"]
    assert keep["action"] == "keep" and re.fullmatch(keep["regex"], cloudwatch.SERVE_REQUESTS)
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert job["file_sd_configs"][0]["files"][0].endswith(PROMETHEUS_SERVICE_DISCOVERY_FILE)  # what Ray writes

    prom = _load("agent.json")["logs"]["metrics_collected"]["prometheus"]
    assert prom["prometheus_config_path"].endswith("ray-app-prometheus.yaml")
    emf = prom["emf_processor"]
    (declaration,) = emf["metric_declaration"]
    assert emf["metric_namespace"] == cloudwatch.SERVE_NAMESPACE
    assert re.fullmatch(declaration["label_matcher"], job["job_name"])  # the scrape job's label
    assert any(re.search(s, cloudwatch.SERVE_REQUESTS) for s in declaration["metric_selectors"])
    assert declaration["dimensions"] == [[cloudwatch.SERVE_STATUS]]

    alarm = _serve_alarm()
    stats = [q for q in alarm["Metrics"] if "MetricStat" in q]
    assert {q["MetricStat"]["Metric"]["Namespace"] for q in stats} == {cloudwatch.SERVE_NAMESPACE}
    assert {q["MetricStat"]["Metric"]["MetricName"] for q in stats} == {cloudwatch.SERVE_REQUESTS}
    codes = [q["MetricStat"]["Metric"]["Dimensions"] for q in stats]
    assert all(len(d) == 1 and d[0]["Name"] == cloudwatch.SERVE_STATUS for d in codes)
    assert sorted(d[0]["Value"] for d in codes) == sorted(cloudwatch.SERVE_5XX_ALARMED)
    assert "503" not in cloudwatch.SERVE_5XX_ALARMED
    (expression,) = [q for q in alarm["Metrics"] if "Expression" in q]
    assert sorted(re.findall(r"FILL\((\w+), 0\)", expression["Expression"])) == sorted(q["Id"] for q in stats)
    assert expression["ReturnData"] and not any(q["ReturnData"] for q in stats)

    cw = boto3.client("cloudwatch")
    namespace = f"{cloudwatch.SERVE_NAMESPACE}-test-{os.getpid()}"

    def five_minutes(counts: dict[str, float]) -> float:
        """The alarm's expression over one period's sums, FILL(x, 0) for a code without data."""
        cw.put_metric_data(
            Namespace=namespace,
            MetricData=[
                {
                    "MetricName": cloudwatch.SERVE_REQUESTS,
                    "Dimensions": [{"Name": cloudwatch.SERVE_STATUS, "Value": code}],
                    "Value": n,
                    "Unit": "Count",
                }
                for code, n in counts.items()
            ],
        )
        total = 0.0
        for q in stats:
            metric = q["MetricStat"]["Metric"]
            got = cw.get_metric_statistics(
                Namespace=namespace,
                MetricName=metric["MetricName"],
                Dimensions=metric["Dimensions"],
                StartTime="2000-01-01T00:00:00Z",
                EndTime="2100-01-01T00:00:00Z",
                Period=q["MetricStat"]["Period"],
                Statistics=[q["MetricStat"]["Stat"]],
            )["Datapoints"]
            total += sum(p["Sum"] for p in got)
        return total

    assert five_minutes({"200": 40.0, "503": 25.0}) < alarm["Threshold"]  # backpressure while scaling from zero
    assert five_minutes({"502": 1.0}) >= alarm["Threshold"]  # S3 or the passport store failed


@pytest.mark.timeout(400)
def test_serve_emits_the_counter_the_alarm_reads_on_rays_metrics_endpoint(ray_cluster):
    """The other side, for real: the app on the session's Ray answers a 501 (no passport store configured) and
    a 401 (no token), and Ray's Prometheus endpoint on 127.0.0.1 then carries the counter the agent keeps, by
    status code, with the label the alarm's dimension is made of."""
    import time
    import urllib.request

    import ray

    from tests._service import running_service

    token = "t" * 40
    with running_service(token, {}) as client:
        assert client.get("/v1/passports/anything", headers={"Authorization": f"Bearer {token}"}).status_code == 501
        assert client.get("/v1/passports/anything").status_code == 401
        line = re.compile(r"^(\w+)\{(.*)\} (\S+)$")  # a route label can hold braces: /v1/passports/{scan_id}
        deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
        while True:
            seen: dict[str, float] = {}
            for node in (n for n in ray.nodes() if n["Alive"]):
                url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
                for text in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
                    m = line.match(text)
                    if m and m[1] == cloudwatch.SERVE_REQUESTS:
                        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
                        code = labels.get(cloudwatch.SERVE_STATUS)
                        seen[code] = seen.get(code, 0.0) + float(m[3])
            if {"501", "401"} <= set(seen) or time.monotonic() > deadline:
                break
            time.sleep(3)
    assert seen.get("501", 0) >= 1 and seen.get("401", 0) >= 1, seen
    assert "501" in cloudwatch.SERVE_5XX_ALARMED and "401" not in cloudwatch.SERVE_5XX_ALARMED


# ------------------------------------------------------------------------------ the agent, switched on


def _with_agent(moto_server) -> tuple[dict, str]:
    """cluster.yaml with the CloudWatch section and the agent, its images pinned through moto's SSM. moto refuses to
    create parameters under /aws/ (AWS's own namespace), so the resolve:ssm: path is moved under /ray-app-test/."""
    ec2, ssm = boto3.client("ec2"), boto3.client("ssm")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ssm.put_parameter(Name="/ray-app-test/dlami/ami-id", Value=ami, Type="String", Overwrite=True)
    config = cloudwatch.with_cloudwatch(load_cluster())
    for node_type in config["available_node_types"].values():
        image = node_type["node_config"]["ImageId"]
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/")
        node_type["node_config"]["ImageId"] = "resolve:ssm:/ray-app-test/dlami/ami-id"
    return cloudwatch.with_agent(config, ssm=ssm), ami


def test_with_the_agent_the_images_are_pinned_and_rays_provider_launches_every_node_type(
    moto_server, tmp_path, monkeypatch
):
    """The first precondition met in the config: every ImageId pinned to the AMI its SSM parameter names today, so
    the DescribeImages that Ray's create_node makes once ``agent.config`` is set succeeds, and Ray's real AWS provider
    launches each node type (against moto); the same config with resolve:ssm: ids fails there, as before."""
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    from ray_app.ops import aws_setup

    agent, ami = _with_agent(moto_server)
    assert {t["node_config"]["ImageId"] for t in agent["available_node_types"].values()} == {ami}
    assert agent["provider"]["cloudwatch"]["agent"]["config"] == "deploy/cloudwatch/agent.json"
    assert "-v /tmp/ray:/tmp/ray" in agent["docker"]["run_options"]
    assert "cloudwatch" not in load_cluster()["provider"]  # the default path is unchanged
    assert cloudwatch.with_agent(agent, ssm=boto3.client("ssm")) == agent  # idempotent
    config = prepare_config(agent)
    validate_config(config)

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
    config["provider"]["aws_credentials"] = {
        "endpoint_url": moto_server,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    config = bootstrap_aws(config)
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    ec2 = boto3.client("ec2")
    launched = []
    for name, node_type in config["available_node_types"].items():
        kind = "head" if name == config["head_node_type"] else "worker"
        (instance_id,) = provider.create_node(
            node_type["node_config"], {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: name}, 1
        )
        launched.append(instance_id)
        attribute = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        assert attribute["UserData"]["Value"], name  # the agent's install reaches every node
    provider.terminate_nodes(launched)  # the moto server is shared: leave no node for the next test's cluster
    unpinned = dict(config["available_node_types"][config["head_node_type"]]["node_config"])
    unpinned["ImageId"] = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/latest/ami-id"
    with pytest.raises(ClientError, match="InvalidAMIID"):
        provider.create_node(unpinned, {TAG_RAY_NODE_KIND: "head", TAG_RAY_USER_NODE_TYPE: "x"}, 1)


def test_the_agents_user_data_is_a_valid_script_that_writes_the_scrape_configuration(tmp_path):
    script = cloudwatch.agent_user_data()
    assert script.startswith("#!/bin/bash\n") and cloudwatch.AGENT_DEB in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # syntax only: it installs a package
    # The heredoc part, run against a temporary path: it writes prometheus.yaml byte for byte (less a final newline).
    part = script[script.index("cat > ") : script.index("RAY_APP_EOF\n", script.index("<<'RAY_APP_EOF'") + 20) + 12]
    target = tmp_path / "ray-app-prometheus.yaml"
    subprocess.run(["bash", "-c", part.replace(cloudwatch.AGENT_PROMETHEUS_PATH, str(target), 1)], check=True)
    assert target.read_text() == (CW_DIR / "prometheus.yaml").read_text()
    prom = _load("agent.json")["logs"]["metrics_collected"]["prometheus"]
    assert prom["prometheus_config_path"] == cloudwatch.AGENT_PROMETHEUS_PATH
    # The container's Ray user must be able to write the host's /tmp/ray once it is bind-mounted.
    assert "install -d -m 1777 /tmp/ray" in script


def test_cluster_run_cloudwatch_agent_gives_the_launcher_the_agent_config(moto_server, tmp_path):
    """``ray-app cluster run --cloudwatch-agent``: the config the launcher gets has the dashboard and alarms, the
    agent's config, Ray's log folder shared with the host, and every AMI pinned through SSM."""
    import yaml

    from ray_app.ops.cluster import CLUSTER_YAML

    ec2, ssm = boto3.client("ec2"), boto3.client("ssm")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ssm.put_parameter(Name="/ray-app-test/dlami/ami-id", Value=ami, Type="String", Overwrite=True)
    conf = yaml.safe_load(CLUSTER_YAML.read_text())
    for node_type in conf["available_node_types"].values():  # moto refuses parameters under /aws/
        node_type["node_config"]["ImageId"] = "resolve:ssm:/ray-app-test/dlami/ami-id"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(conf))
    argv = ["cluster", "run", "--config", str(path), "--cloudwatch-agent", "--", "--manifest", "m.csv"]
    got = cli.cluster_config(cli.build_parser().parse_args(argv))
    assert got["provider"]["cloudwatch"]["agent"]["config"] == "deploy/cloudwatch/agent.json"
    assert set(got["provider"]["cloudwatch"]) >= {"dashboard", "alarm", "agent"}
    assert "-v /tmp/ray:/tmp/ray" in got["docker"]["run_options"]
    assert {t["node_config"]["ImageId"] for t in got["available_node_types"].values()} == {ami}
    plain = cli.cluster_config(cli.build_parser().parse_args(argv[:4] + argv[5:]))
    assert "cloudwatch" not in plain["provider"]  # without the flag the config is cluster.yaml's own
