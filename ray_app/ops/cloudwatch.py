"""The batch job's outcome as CloudWatch metrics, for the dashboard and the failure-share alarm in
``deploy/cloudwatch/`` (which Ray's launcher puts from the cluster's ``provider.cloudwatch``:
``ray-app cluster run --cloudwatch`` adds ``deploy/cloudwatch/provider.yaml`` there).

Opt-in: a job publishes only when ``RAY_APP_CLOUDWATCH_NAMESPACE`` is set (``ray-app cluster run`` carries the
operator's ``RAY_APP_*`` variables to the job), so local runs and tests never call CloudWatch. One
``PutMetricData`` per job, after the summary is written:

* ``ScansSucceeded`` and ``ScansFailed`` (Count, no dimensions: what the alarm divides), and
* ``ScansFailedByCode`` with an ``ErrorCode`` dimension, one datum per code (the dashboard's breakdown). A name
  of its own, so no statistic of ``ScansFailed`` can ever add the breakdown to the total (moto's does).

Only counts and error codes leave the job: no scan ids, no paths.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ray_app.ops.aws_setup import DEPLOY_DIR

ENV_NAMESPACE = "RAY_APP_CLOUDWATCH_NAMESPACE"
DEFAULT_NAMESPACE = "ray-app"
SUCCEEDED = "ScansSucceeded"
FAILED = "ScansFailed"
FAILED_BY_CODE = "ScansFailedByCode"
ERROR_CODE = "ErrorCode"
METRIC_NAMES = (SUCCEEDED, FAILED, FAILED_BY_CODE)


def job_metric_data(rows: list[dict]) -> list[dict]:
    """The ``MetricData`` of one job from its summary rows (``status``, ``error_code``)."""
    ok = sum(1 for r in rows if r.get("status") == "ok")
    codes = Counter(r.get("error_code") or "unknown" for r in rows if r.get("status") in ("failed", "rejected"))
    data = [
        {"MetricName": SUCCEEDED, "Value": float(ok), "Unit": "Count"},
        {"MetricName": FAILED, "Value": float(sum(codes.values())), "Unit": "Count"},
    ]
    data += [
        {
            "MetricName": FAILED_BY_CODE,
            "Dimensions": [{"Name": ERROR_CODE, "Value": code}],
            "Value": float(n),
            "Unit": "Count",
        }
        for code, n in sorted(codes.items())
    ]
    return data


def publish_job(rows: list[dict], namespace: str | None = None) -> bool:
    """Put the job's metrics when a namespace is given or configured; returns whether it did."""
    namespace = namespace or os.environ.get(ENV_NAMESPACE)
    if not namespace:
        return False
    from ray_app import storage

    storage.client("cloudwatch").put_metric_data(Namespace=namespace, MetricData=job_metric_data(rows))
    return True


PROVIDER_YAML = DEPLOY_DIR / "cloudwatch" / "provider.yaml"
#: The Serve endpoint's cluster (deploy/serve-cluster.yaml) gets its own section: the Serve 5xx alarm only.
SERVE_PROVIDER_YAML = DEPLOY_DIR / "cloudwatch" / "serve-provider.yaml"
#: Ray Serve's request counter as Ray's Prometheus endpoint exposes it (``serve_num_http_requests``, a counter:
#: ``ray_`` prefix and ``_total`` suffix), with its ``status_code`` label; the CloudWatch agent puts it in
#: SERVE_NAMESPACE with that label as the dimension (deploy/cloudwatch/agent.json, prometheus.yaml), and the Serve
#: 5xx alarm adds up these codes. 503 is left out: the endpoint's backpressure and model-loading answer.
SERVE_REQUESTS = "ray_serve_num_http_requests_total"
SERVE_STATUS = "status_code"
SERVE_NAMESPACE = "ray-app-serve"
SERVE_5XX_ALARMED = ("500", "501", "502", "504")


def with_cloudwatch(cluster: dict, provider_yaml: Path = PROVIDER_YAML) -> dict:
    """``cluster`` with ``deploy/cloudwatch/provider.yaml`` as its ``provider.cloudwatch`` (``cluster run
    --cloudwatch``): the dashboard and alarms through Ray's launcher; the Serve cluster's with
    SERVE_PROVIDER_YAML."""
    import copy

    import yaml

    out = copy.deepcopy(cluster)
    out["provider"]["cloudwatch"] = yaml.safe_load(provider_yaml.read_text())["cloudwatch"]
    return out


def check_cluster_files(cluster: dict) -> str:
    """Preflight: the files ``provider.cloudwatch`` names exist where Ray's launcher will open them (relative to the
    working directory of ``ray up``); a missing one would stop the head's setup after the node is already paid for."""
    from ray_app.core.errors import PreflightError

    section = (cluster.get("provider") or {}).get("cloudwatch") or {}
    paths = [v["config"] for v in section.values() if isinstance(v, dict) and v.get("config")]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise PreflightError(
            f"cluster.yaml's provider.cloudwatch names {', '.join(missing)}, not found from "
            f"{Path.cwd()}: Ray opens them relative to the working directory; run from the "
            "checkout's root"
        )
    return f"CloudWatch files: {', '.join(paths)}" if paths else "CloudWatch: not configured"


# -------------------------------------------------------------------------------------- the agent, opt-in

#: Where the agent reads the Prometheus scrape configuration (agent.json names it; the host gets it from UserData).
AGENT_PROMETHEUS_PATH = "/opt/aws/amazon-cloudwatch-agent/etc/ray-app-prometheus.yaml"
AGENT_CONFIG = "deploy/cloudwatch/agent.json"
#: The agent's Ubuntu package as AWS publishes it (docs: "Download the CloudWatch agent package ... Ubuntu, x86-64").
AGENT_DEB = "https://amazoncloudwatch-agent.s3.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb"
DOCKER_TMP_MOUNT = "-v /tmp/ray:/tmp/ray"


def agent_user_data() -> str:
    """EC2 UserData (cloud-init, at first boot, before Ray's updater reaches the node over SSH): install the agent,
    put the Prometheus scrape configuration where agent.json names it, and give the container's non-root Ray user a
    host ``/tmp/ray`` it can write (Docker would create the bind mount's source as root)."""
    scrape = (DEPLOY_DIR / "cloudwatch" / "prometheus.yaml").read_text()
    return "\n".join(
        [
            "#!/bin/bash",
            "set -eu",
            "install -d -m 1777 /tmp/ray",
            f"curl -fsSL -o /tmp/amazon-cloudwatch-agent.deb {AGENT_DEB}",
            "dpkg -i -E /tmp/amazon-cloudwatch-agent.deb",
            f"cat > {AGENT_PROMETHEUS_PATH} <<'RAY_APP_EOF'",
            scrape.rstrip("\n"),
            "RAY_APP_EOF",
            "",
        ]
    )


def resolve_ssm_image(image_id: str, ssm=None) -> str:
    """``resolve:ssm:/path`` -> the ``ami-...`` that parameter holds today (what EC2 itself would launch);
    any other id unchanged."""
    if not image_id.startswith("resolve:ssm:"):
        return image_id
    if ssm is None:
        from ray_app import storage

        ssm = storage.client("ssm")
    value = ssm.get_parameter(Name=image_id.removeprefix("resolve:ssm:"))["Parameter"]["Value"]
    if not value.startswith("ami-"):
        raise ValueError(f"{image_id} resolves to {value!r}, not an AMI id")
    return value


def with_agent(cluster: dict, ssm=None) -> dict:
    """``cluster`` (already ``with_cloudwatch``) with the CloudWatch agent switched on, each precondition of
    deploy/cloudwatch/README.md met in the config itself:

    1. every ``resolve:ssm:`` ImageId pinned to the AMI it resolves to now (with the caller's credentials), since
       Ray's create_node calls DescribeImages on it once ``agent.config`` is set, which refuses ``resolve:ssm:``;
    2. ``agent.config`` = deploy/cloudwatch/agent.json;
    3. ``-v /tmp/ray:/tmp/ray`` in the Docker run options, so the agent on the host sees Ray's logs and the
       Prometheus service-discovery file;
    4. UserData on every node type that installs the agent at first boot (:func:`agent_user_data`): Ray's
       CloudwatchHelper asks the node through SSM whether the agent is installed right after SSH answers, before
       any ``initialization_commands`` run, so it must be there from boot (or in the AMI).
    Applied by ``ray-app cluster run --cloudwatch-agent``; not tried on AWS (none here)."""
    import copy

    out = copy.deepcopy(cluster)
    if "cloudwatch" not in out.get("provider", {}):
        raise ValueError("apply with_cloudwatch first: the agent goes with the dashboard and alarms")
    out["provider"]["cloudwatch"].setdefault("agent", {})["config"] = AGENT_CONFIG
    options = out.setdefault("docker", {}).setdefault("run_options", [])
    if DOCKER_TMP_MOUNT not in options:
        options.append(DOCKER_TMP_MOUNT)
    user_data = agent_user_data()
    for node_type in out["available_node_types"].values():
        node = node_type["node_config"]
        node["ImageId"] = resolve_ssm_image(node["ImageId"], ssm)
        if node.get("UserData") not in (None, user_data):
            raise ValueError("a node type has UserData of its own: merge the agent's install into it by hand")
        node["UserData"] = user_data
    return out
