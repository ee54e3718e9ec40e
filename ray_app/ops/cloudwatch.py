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
